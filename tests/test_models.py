"""Shapes and conventions of fastcl.models."""
import math

import pytest
import torch
from torch import nn

from fastcl.models import MAX_LOGIT_SCALE, MaskedTokenEncoder, ProjectionHead, SimCLR, TwoTower


def _unit_norms(z):
    return z.norm(dim=-1)


def test_projection_head_shapes_and_layers():
    head = ProjectionHead(16, 32, 8, num_layers=3, batch_norm=True)
    assert head(torch.randn(5, 16)).shape == (5, 8)
    assert sum(isinstance(m, nn.Linear) for m in head.modules()) == 3
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == 2
    single = ProjectionHead(16, 32, 8, num_layers=1)
    assert [type(m) for m in single.net] == [nn.Linear]
    no_bn = ProjectionHead(16, 32, 8, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in no_bn.modules())


@pytest.mark.parametrize("kwargs, name", [(dict(in_dim=0), "in_dim"), (dict(hidden_dim=-1), "hidden_dim"),
                                          (dict(out_dim=2.5), "out_dim"), (dict(num_layers=0), "num_layers")])
def test_projection_head_bad_args_name_the_argument(kwargs, name):
    args = dict(in_dim=4, hidden_dim=8, out_dim=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ProjectionHead(**args)


def test_projection_head_checks_input_width():
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        ProjectionHead(4, 8, 2)(torch.randn(3, 5))


def test_simclr_returns_normalised_pairs():
    torch.manual_seed(0)
    model = SimCLR(nn.Linear(10, 12), ProjectionHead(12, 16, 6))
    x0, x1 = torch.randn(7, 10), torch.randn(7, 10)
    z0, z1 = model(x0, x1)
    assert z0.shape == z1.shape == (7, 6)
    torch.testing.assert_close(_unit_norms(z0), torch.ones(7))
    torch.testing.assert_close(_unit_norms(z1), torch.ones(7))
    assert model.embed(x0).shape == (7, 12)
    model.eval()
    torch.testing.assert_close(model(x0), model.project(x0))
    with pytest.raises(ValueError, match="x0 and x1"):
        model(x0, x1[:3])
    with pytest.raises(TypeError, match="head"):
        SimCLR(nn.Linear(2, 2), lambda x: x)


def test_two_tower_open_clip_conventions():
    torch.manual_seed(0)
    model = TwoTower(nn.Linear(6, 4), nn.Embedding(20, 4), embed_dim=4)
    img, txt = torch.randn(5, 6), torch.randint(0, 20, (5,))
    out = model(img, txt)
    assert len(out) == 3
    fi, ft, scale = out
    assert fi.shape == ft.shape == (5, 4)
    torch.testing.assert_close(_unit_norms(fi), torch.ones(5))
    torch.testing.assert_close(_unit_norms(ft), torch.ones(5))
    assert scale.dim() == 0
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07))
    # The raw (unnormalised) features are what the encoders give.
    torch.testing.assert_close(model.encode_image(img, normalize=False), model.image_encoder(img))


def test_two_tower_scale_clamped_at_100_and_bias():
    model = TwoTower(nn.Linear(3, 2), nn.Linear(3, 2), embed_dim=2, init_logit_scale=math.log(1000.0),
                     init_logit_bias=-10.0)
    fi, ft, scale, bias = model(torch.randn(4, 3), torch.randn(4, 3))
    assert scale.item() == MAX_LOGIT_SCALE == 100.0
    assert bias.item() == -10.0 and bias.requires_grad
    scale.backward()
    assert float(model.logit_scale.grad) == 0.0  # clamped: no gradient pushes it further
    low = TwoTower(nn.Linear(3, 2), nn.Linear(3, 2), embed_dim=2, init_logit_scale=1.0)
    s = low.scale()
    s.backward()
    torch.testing.assert_close(low.logit_scale.grad, torch.tensor(math.e))


def test_two_tower_feeds_clip_loss():
    from fastcl import clip_loss
    model = TwoTower(nn.Linear(6, 4), nn.Linear(5, 4), embed_dim=4)
    loss = clip_loss(*model(torch.randn(8, 6), torch.randn(8, 5)))
    loss.backward()
    assert torch.isfinite(loss) and model.logit_scale.grad is not None


def test_two_tower_errors_name_the_argument():
    with pytest.raises(ValueError, match="embed_dim"):
        TwoTower(nn.Linear(3, 2), nn.Linear(3, 5), embed_dim=2)(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="embed_dim"):
        TwoTower(nn.Linear(3, 2), nn.Linear(3, 2), embed_dim=0)
    with pytest.raises(TypeError, match="text_encoder"):
        TwoTower(nn.Linear(3, 2), "bert", embed_dim=2)
    with pytest.raises(ValueError, match="init_logit_bias"):
        TwoTower(nn.Linear(3, 2), nn.Linear(3, 2), embed_dim=2, init_logit_bias=float("nan"))
    with pytest.raises(ValueError, match="image and text"):
        TwoTower(nn.Linear(3, 2), nn.Linear(3, 2), embed_dim=2)(torch.randn(2, 3), torch.randn(3, 3))


def test_masked_token_encoder_arguments():
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedTokenEncoder(nn.Identity(), mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedTokenEncoder(nn.Identity(), mask_ratio=-0.1)
    with pytest.raises(TypeError, match="encoder"):
        MaskedTokenEncoder(None, 0.5)
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        MaskedTokenEncoder(nn.Identity(), 0.5)(torch.randn(4, 5))


def test_masked_token_encoder_keeps_lowest_noise_tokens():
    torch.manual_seed(0)
    b, length, d = 3, 8, 4
    x = torch.randn(b, length, d)
    noise = torch.rand(b, length)
    enc = MaskedTokenEncoder(nn.Linear(d, 6), mask_ratio=0.75)
    latent, mask, ids_restore = enc(x, noise=noise)
    keep = int(length * (1 - 0.75))
    assert latent.shape == (b, keep, 6)
    assert mask.shape == (b, length) and ids_restore.shape == (b, length)
    # The kept tokens are the `keep` lowest-noise ones, fed through the encoder.
    kept_ids = noise.argsort(1)[:, :keep]
    expected = enc.encoder(torch.gather(x, 1, kept_ids[..., None].expand(-1, -1, d)))
    torch.testing.assert_close(latent, expected)
    assert int(mask.sum()) == b * (length - keep)
    torch.testing.assert_close(mask.gather(1, kept_ids), torch.zeros(b, keep, dtype=mask.dtype))


def test_projection_head_layer_order_and_bias():
    """SimCLR's head: Linear -> BN -> ReLU per hidden layer, the hidden Linear without bias when
    BN follows it (BN's shift makes it redundant) and with bias when not."""
    head = ProjectionHead(16, 32, 8, num_layers=3, batch_norm=True)
    assert [type(m) for m in head.net] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert [m.bias is None for m in head.net if isinstance(m, nn.Linear)] == [True, True, False]
    no_bn = ProjectionHead(16, 32, 8, num_layers=2, batch_norm=False)
    assert [type(m) for m in no_bn.net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(m.bias is not None for m in no_bn.net if isinstance(m, nn.Linear))


@pytest.mark.parametrize("name", ["in_dim", "hidden_dim", "out_dim", "num_layers"])
def test_projection_head_refuses_bools(name):
    args = dict(in_dim=4, hidden_dim=8, out_dim=2, num_layers=2)
    args[name] = True  # an int subclass, 1, but never a size
    with pytest.raises(ValueError, match=name):
        ProjectionHead(**args)


def test_projection_head_refuses_3d_input():
    """(B, L, in_dim) would pass through nn.Linear on the last dim: refused, as documented."""
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        ProjectionHead(4, 8, 2)(torch.randn(3, 4, 4))


def test_two_tower_text_features_unnormalised_and_low_scale():
    """encode_text(normalize=False) gives the encoder's raw output; the scale is only capped
    above, so a log scale below 0 gives exp(log scale) < 1 with its gradient."""
    torch.manual_seed(0)
    model = TwoTower(nn.Linear(6, 4), nn.Linear(5, 4), embed_dim=4, init_logit_scale=-1.0)
    txt = torch.randn(3, 5)
    torch.testing.assert_close(model.encode_text(txt, normalize=False), model.text_encoder(txt))
    s = model.scale()
    torch.testing.assert_close(s, torch.tensor(math.exp(-1.0)))
    s.backward()
    torch.testing.assert_close(model.logit_scale.grad, torch.tensor(math.exp(-1.0)))


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_two_tower_refuses_non_finite_logit_scale(value):
    with pytest.raises(ValueError, match="init_logit_scale"):
        TwoTower(nn.Linear(3, 2), nn.Linear(3, 2), embed_dim=2, init_logit_scale=value)


def test_two_tower_refuses_non_2d_features():
    """An encoder returning (B, L, embed_dim) tokens instead of pooled features is refused by name."""
    model = TwoTower(nn.Linear(3, 2), nn.Linear(3, 2), embed_dim=2)
    with pytest.raises(ValueError, match="image_encoder"):
        model(torch.randn(4, 5, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="text_encoder"):
        TwoTower(nn.Linear(3, 2), nn.Linear(3, 5), embed_dim=2)(torch.randn(4, 3), torch.randn(4, 3))


def test_two_tower_integer_init_gives_float32_parameters():
    """Integer initial values (0, -10) still give learnable float32 parameters."""
    model = TwoTower(nn.Linear(3, 2), nn.Linear(3, 2), embed_dim=2, init_logit_scale=0, init_logit_bias=-10)
    assert model.logit_scale.dtype == model.logit_bias.dtype == torch.float32
    assert model.logit_scale.requires_grad and model.scale().item() == 1.0


def test_masked_token_encoder_ratio_bounds_and_type():
    """mask_ratio=0 (keep all) is allowed, as random_masking's [0, 1); a bool is refused."""
    x = torch.randn(2, 5, 3)
    latent, mask, _ = MaskedTokenEncoder(nn.Identity(), mask_ratio=0)(x, noise=torch.rand(2, 5))
    assert latent.shape == (2, 5, 3) and not mask.any()
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedTokenEncoder(nn.Identity(), mask_ratio=False)


def test_masked_token_encoder_passes_generator_and_pos_embed():
    """The generator draws the noise (same seed, same tokens; MAE's float mask) and pos_embed is
    added to the kept tokens."""
    b, length, d = 2, 8, 3
    x, pos = torch.randn(b, length, d), torch.randn(length, d)
    enc = MaskedTokenEncoder(nn.Identity(), mask_ratio=0.5)
    latent, mask, ids_restore = enc(x, generator=torch.Generator().manual_seed(3), pos_embed=pos)
    assert mask.dtype == torch.float32
    noise = torch.rand(b, length, generator=torch.Generator().manual_seed(3))
    kept_ids = noise.argsort(1)[:, :length // 2]
    torch.testing.assert_close(ids_restore, noise.argsort(1).argsort(1))
    expected = torch.gather(x + pos, 1, kept_ids[..., None].expand(-1, -1, d))
    torch.testing.assert_close(latent, expected)


def test_simclr_pair_projects_each_view():
    torch.manual_seed(0)
    model = SimCLR(nn.Linear(10, 12), ProjectionHead(12, 16, 6)).eval()
    x0, x1 = torch.randn(4, 10), torch.randn(4, 10)
    z0, z1 = model(x0, x1)
    torch.testing.assert_close(z0, model.project(x0))
    torch.testing.assert_close(z1, model.project(x1))


def test_two_tower_refuses_a_non_module_image_encoder():
    with pytest.raises(TypeError, match="image_encoder"):
        TwoTower(lambda x: x, nn.Linear(3, 2), embed_dim=2)
