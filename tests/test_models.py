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
    pytest.importorskip("fastcl.masking")
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
