"""Bad input raises a clear error that names the argument."""
import pytest
import torch

import fastcl
from conftest import TOL, assert_close
from fastcl.ops import similarity_lse

_gen = torch.Generator().manual_seed(0)
q, k = torch.randn(5, 8, generator=_gen), torch.randn(6, 8, generator=_gen)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: similarity_lse(q, torch.randn(6, 7), 1.0), ValueError, "feature size D"),
    (lambda: similarity_lse(q[0], k, 1.0), ValueError, "q must be 2-D"),
    (lambda: similarity_lse(q, k[None], 1.0), ValueError, "k must be 2-D"),
    (lambda: similarity_lse(q.long(), k, 1.0), TypeError, "q must be float"),
    (lambda: similarity_lse(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), 1.0), TypeError,
     "q must be float32, bfloat16, float16 or float64, got torch.float8_e4m3fn"),
    (lambda: similarity_lse(q, k.double(), 1.0), TypeError, "same dtype"),
    (lambda: similarity_lse(q, k.to("meta"), 1.0), ValueError, "same device"),
    (lambda: similarity_lse(q, k, 0.0), ValueError, "scale must be > 0"),
    (lambda: similarity_lse(q, k, torch.tensor(-1.0)), ValueError, "scale must be > 0"),
    (lambda: similarity_lse(q, k, torch.ones(2)), ValueError, "scale must be a scalar"),
    (lambda: similarity_lse(q, k, "1"), TypeError, "scale must be a float"),
    (lambda: fastcl.clip_loss(q, k[:5], torch.tensor(2)), TypeError, "logit_scale must be a floating tensor, got torch.int64"),
    (lambda: similarity_lse(q, k, 1.0, bias="x"), TypeError, "bias must be a float"),
    (lambda: similarity_lse(q, k, 1.0, exclude_diagonal=1.5), TypeError, "exclude_diagonal"),
    (lambda: similarity_lse(q, k, 1.0, exclude_diagonal=True), TypeError, "exclude_diagonal must be None or an int, got bool"),
    (lambda: similarity_lse(q, k, 1.0, rows=False, cols=False), ValueError, "rows or cols"),
    (lambda: similarity_lse(q[:0], k, 1.0), ValueError, "q must be non-empty"),
    (lambda: similarity_lse(q[:, :0], k[:, :0], 1.0), ValueError, r"q must be non-empty, got shape \(5, 0\)"),
    (lambda: similarity_lse(q, k, 1.0, backend="fast"), ValueError, "backend must be one of"),
    (lambda: fastcl.clip_loss(q, k, 1.0), ValueError, r"clip_loss\(\.\.\., labels=\.\.\.\) takes layouts"),
    (lambda: fastcl.siglip_loss(k, q, 1.0), ValueError, "text_features has 5 rows but image_features has 6"),
    (lambda: fastcl.nn.SigLipLoss()(k, q, 1.0, None), ValueError, "every image needs its text"),
    (lambda: fastcl.clip_loss(q, k, 1.0, labels=torch.tensor([0, 1, 2, 3, 6])), ValueError, r"labels must lie in \[0, 6\)"),
    (lambda: fastcl.clip_loss(q, k, 1.0, labels=torch.tensor([0, 1, 2, 3, -1])), ValueError, "labels must lie"),
    (lambda: fastcl.clip_loss(q, k, 1.0, labels=torch.zeros(4, dtype=torch.long)), ValueError, r"labels must have shape \(5,\)"),
    (lambda: fastcl.clip_loss(q, k, 1.0, labels=torch.zeros(5)), TypeError, "labels must be an integer"),
    (lambda: fastcl.clip_loss(q, k, 1.0, labels=torch.arange(5, device="meta")), ValueError,
     "labels must be on cpu, got meta"),
    (lambda: fastcl.clip_loss(q, k[:5], True), TypeError, "logit_scale must be a float or a scalar tensor, got bool"),
    # the int64 bounds, one past each (2**70 is far past; 2**63 - 1 and -2**63 are accepted)
    (lambda: similarity_lse(q, k, 1.0, exclude_diagonal=2**63), ValueError, "exclude_diagonal must fit in int64"),
    (lambda: similarity_lse(q, k, 1.0, exclude_diagonal=-2**63 - 1), ValueError, "exclude_diagonal must fit in int64"),
    (lambda: fastcl.clip_loss(q, k, 1.0, labels=torch.zeros(5, dtype=torch.uint32)), TypeError,
     "labels must be an integer tensor .*uint8"),
    (lambda: fastcl.gather_tokens(torch.zeros(1, 3, 2), torch.zeros(1, 2, dtype=torch.bool)), TypeError,
     "ids_keep must be an integer"),
    (lambda: fastcl.clip_loss(q, k[:5], -2.0), ValueError, "logit_scale must be > 0"),
    (lambda: fastcl.clip_loss(q, k[:5], 2.0, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: fastcl.clip_loss(q[:0], k[:0], 2.0), ValueError, "image_features must be non-empty"),
    (lambda: fastcl.info_nce(q, k, label_smoothing=True), TypeError, "label_smoothing must be a float, got bool"),
    (lambda: fastcl.clip_loss(q, k[:5], 2.0, label_smoothing=-0.1), ValueError,
     r"label_smoothing must be in \[0, 1\], got -0.1"),
    (lambda: fastcl.info_nce(q, k, temperature=0.1, logit_scale=10.0), ValueError, "not both"),
    (lambda: fastcl.info_nce(q, k, temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda: fastcl.info_nce(k, q), ValueError, "keys has 5 rows but query has 6; give the positive column"),
    (lambda: fastcl.info_nce(q, k, exclude_self=True), ValueError, "excluded diagonal"),
    # one positive on the diagonal is enough (the default positives are all on it)
    (lambda: fastcl.info_nce(q, k, positives=torch.tensor([1, 0, 2, 4, 3]), exclude_self=True), ValueError,
     "excluded diagonal"),
    (lambda: fastcl.info_nce(q, k, positives=torch.tensor([0, 1, 2, 3, 9])), ValueError, "positives must lie"),
    (lambda: fastcl.nn.ClipLoss(world_size=0), ValueError, "world_size"),
    (lambda: fastcl.nn.ClipLoss(rank=2, world_size=2), ValueError, "rank"),
    (lambda: fastcl.nn.ClipLoss(rank=0, world_size=2)(q, q, 1.0), RuntimeError, "init_process_group"),
    (lambda: fastcl.nn.ClipLoss(True, False, rank=0, world_size=2, dist_impl="ring"), ValueError,
     "gather_with_grad"),
    (lambda: fastcl.nn.ClipLoss(dist_impl="allgather"), ValueError, "dist_impl must be one of"),
    (lambda: fastcl.nn.InfoNCELoss(temperature=-1.0), ValueError, "temperature must be > 0"),
    (lambda: fastcl.nn.ClipLoss(world_size=True), ValueError, "world_size must be an int"),
    (lambda: fastcl.nn.SigLipLoss(rank=False, world_size=2), ValueError, "rank must be an int"),
    (lambda: fastcl.siglip_loss(q[0], k, 1.0), ValueError, "image_features must be 2-D"),
    (lambda: fastcl.siglip_loss(q, k.double(), 1.0), TypeError, "image_features and text_features"),
    (lambda: fastcl.siglip_loss(q, k, -1.0), ValueError, "logit_scale must be > 0"),
    (lambda: fastcl.siglip_loss(q, k, 1.0, "x"), TypeError, "logit_bias must be a float"),
    (lambda: similarity_lse(q, k, torch.ones(1, 1)), ValueError, r"scale must be a scalar .*\(1, 1\)"),
    (lambda: fastcl.clip_loss(q, k[:5], torch.ones(1, 1, 1)), ValueError, "logit_scale must be a scalar"),
    (lambda: similarity_lse(q, k, 1.0, exclude_diagonal=2**70), ValueError, "exclude_diagonal must fit in int64"),
    (lambda: similarity_lse(q, k, 1.0, cols="no"), TypeError, "cols must be a bool"),
    (lambda: fastcl.info_nce(q, k, symmetric="no"), TypeError, "symmetric must be a bool"),
    (lambda: fastcl.clip_loss(q, k[:5], float("inf")), ValueError, "logit_scale must be finite"),
    (lambda: fastcl.clip_loss(q, k[:5], -2.6), ValueError, r"logit_scale must be > 0 \(already exponentiated"),
    (lambda: fastcl.ntxent_loss(q, k[:5], float("-inf")), ValueError, "temperature must be finite"),
    (lambda: fastcl.ntxent_loss(q, k[:5], torch.tensor(float("inf"))), ValueError, "temperature must be finite"),
    (lambda: fastcl.clip_loss(q, k[:5], torch.tensor(2.0).exp() ** 100), ValueError, "logit_scale must be finite"),
    # a tensor bias, too: +inf gave +inf on two backends and NaN on the others
    (lambda: similarity_lse(q, k, 1.0, torch.tensor(float("inf"))), ValueError, "bias must be finite"),
    (lambda: fastcl.siglip_loss(q, k[:5], 2.0, torch.tensor(float("-inf"))), ValueError, "logit_bias must be finite"),
    (lambda: fastcl.hypersphere_loss(q, k[:5], lam=torch.tensor(float("inf"))), ValueError, "lam must be finite"),
    (lambda: fastcl.nn.SupConLoss()(q, torch.arange(5), ref_emb=k), ValueError, "ref_emb needs ref_labels"),
    (lambda: fastcl.nn.SupConLoss()(q, torch.arange(5), ref_labels=torch.arange(6)), ValueError, "needs ref_emb"),
    (lambda: fastcl.nn.SupConLoss()(q, torch.arange(5), ref_emb=k, ref_labels=torch.arange(5)), ValueError,
     "ref_labels must have 6 entries"),
    (lambda: fastcl.nn.SupConLoss()(q, torch.arange(5), ref_emb=k[:, :3], ref_labels=torch.arange(6)), ValueError,
     "embeddings and ref_emb"),
    (lambda: fastcl.nn.SupConLoss()(q[:, None], torch.arange(5), ref_emb=k, ref_labels=torch.arange(6)), ValueError,
     "2-D embeddings"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_backend_env_var(monkeypatch):
    monkeypatch.setenv("FASTCL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="the FASTCL_BACKEND environment variable must be one of"):
        similarity_lse(q, k, 1.0)
    monkeypatch.setenv("FASTCL_BACKEND", "cuda")  # valid, but not for CPU tensors: the error says who asked
    with pytest.raises(ValueError, match=r"needs CUDA tensors.*set by FASTCL_BACKEND='cuda'"):
        similarity_lse(q, k, 1.0)
    with pytest.raises(ValueError, match="needs CUDA tensors, got tensors on cpu$"):  # an explicit backend=
        similarity_lse(q, k, 1.0, backend="cuda")
    monkeypatch.setenv("FASTCL_BACKEND", "reference")
    assert similarity_lse(q, k, 1.0).shape == (5,)


def test_cpu_backend_rejects_other_devices():
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        similarity_lse(q.to("meta"), k.to("meta"), 1.0, backend="cpu")


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        similarity_lse(q, k, 1.0, backend="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        similarity_lse(q, k, 1.0, backend="triton")


def test_scale_sign_is_checked_on_the_cpu_only():
    """A GPU tensor's value is never read (it would wait for the device every call): a meta tensor
    stands in for one; a CPU tensor still gets the error."""
    from fastcl.validation import check_scalar
    check_scalar("scale", torch.tensor(-1.0, device="meta"), positive=True)
    with pytest.raises(ValueError, match="scale must be > 0"):
        check_scalar("scale", torch.tensor(-1.0), positive=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_kernels_follow_the_formula_at_any_scale(backend):
    """What an unchecked GPU scale at or below 0 gets: the formula's value, as the reference.  (At
    exactly 0 the CPU kernels' oneDNN GEMM left its output tile stale: they now take addmm there.)"""
    from fastcl._ext import extension_available
    from fastcl.ops.dispatch import triton_available
    if (backend == "cpu" and not extension_available()) or (backend == "triton" and not triton_available()):
        pytest.skip(f"no {backend} backend")
    qq, kk = torch.randn(67, 40), torch.randn(131, 40)
    for scale in (-2.5, 0.0):
        s = torch.tensor(scale)
        row, col, _ = torch.ops.fastcl.similarity_lse_fwd(qq, kk, s, torch.tensor(0.5), True, True, None, False, None,
                                                          backend)
        ref = scale * qq.double() @ kk.double().T + 0.5
        assert_close(row, torch.logsumexp(ref, 1), torch.float32, f"{backend} rows at scale {scale}")
        assert_close(col, torch.logsumexp(ref, 0), torch.float32, f"{backend} cols at scale {scale}")
        z = torch.full_like(ref, -1.0)
        z[range(67), range(67)] = 1.0
        loss = torch.ops.fastcl.sigmoid_pair_fwd(qq, kk, s, torch.tensor(0.5), backend)
        assert_close(loss, -torch.nn.functional.logsigmoid(z * ref).sum(), torch.float32, f"{backend} sigmoid at {scale}")
        # Gradients with the positive pairs (i, i), as CLIP's backward asks for them: dq = dk = 0 at
        # scale 0 (the finished Triton tiles keep an unscaled tile there), and the scale's gradient.
        g_row, g_col, g_pos = torch.rand(67), torch.rand(131), -torch.rand(67)
        dq, dk, qgq = torch.ops.fastcl.similarity_lse_bwd(qq, kk, s, torch.tensor(0.5), row, col, g_row, g_col, g_pos,
                                                          None, None, s, torch.float32, True, True, backend)
        q64, k64, s64 = (t.double().requires_grad_() for t in (qq, kk, s))
        logits = s64 * q64 @ k64.T + 0.5
        total = ((g_row.double() * torch.logsumexp(logits, 1)).sum() + (g_col.double() * torch.logsumexp(logits, 0)).sum()
                 + (g_pos.double() * logits.diagonal()).sum())
        rq, rk, rs = torch.autograd.grad(total, (q64, k64, s64))
        for what, got, want in (("dq", dq, rq), ("dk", dk, rk)):
            if scale == 0:
                assert not got.any(), f"{backend} {what} at scale 0"
            else:
                assert_close(got, want, torch.float32, f"{backend} {what} at scale {scale}")
        # The scale's gradient sums dS_ij * (q_i . k_j), terms of both signs that can cancel to a
        # small total (at scale 0 one draw in 40 lost 2e-5 of it): bound its error by the terms' sizes.
        d_s = g_row.double()[:, None] * torch.softmax(logits.detach(), 1) + g_col.double() * torch.softmax(logits.detach(), 0)
        d_s.diagonal().add_(g_pos.double())
        magnitude = float((d_s * (qq.double() @ kk.double().T)).abs().sum())
        err = abs(float(qgq) - float(rs))
        assert err <= TOL[torch.float32] * magnitude, (f"{backend} scale gradient at scale {scale}: error {err:.3e} "
                                                       f"> {TOL[torch.float32]:.1e} of sum|terms| {magnitude:.3e}")


def test_losses_read_no_values_back():
    """The losses' hot paths never read a tensor value on the host (each read waits for a GPU):
    on meta tensors, which hold no values, any read would raise.  Scales given as device tensors,
    and the pairs NT-Xent and the default CLIP/InfoNCE build themselves, stay on the device."""
    dev = "meta"
    a, b = torch.randn(16, 8, device=dev), torch.randn(16, 8, device=dev)
    scale, bias = torch.tensor(10.0, device=dev), torch.tensor(-10.0, device=dev)
    for call in (lambda: fastcl.clip_loss(a, b, scale, backend="reference"),
                 lambda: fastcl.clip_loss(a, b, 10.0, backend="reference"),
                 lambda: fastcl.siglip_loss(a, b, scale, bias, backend="reference"),
                 lambda: fastcl.info_nce(a, b, temperature=torch.tensor(0.07, device=dev), backend="reference"),
                 lambda: fastcl.ntxent_loss(a, b, temperature=0.5, backend="reference"),
                 lambda: fastcl.dcl_loss(a, b, temperature=0.1, backend="reference"),
                 lambda: similarity_lse(a, b, scale, rows=True, cols=True, positives=True, backend="reference")):
        call()
    # A user's index is range-checked, which reads it: on meta that read raises.
    with pytest.raises(NotImplementedError):
        fastcl.clip_loss(a, b, scale, labels=torch.arange(16, device=dev), backend="reference")


@pytest.mark.parametrize("index,exc,match", [
    (True, TypeError, "^index must be an"),
    (torch.zeros(5), TypeError, "^index must be an integer tensor"),
    (torch.zeros(4, dtype=torch.long), ValueError, r"^index must have shape \(5,\)"),
    (torch.zeros(5, dtype=torch.long, device="meta"), ValueError, "^index must be on cpu"),
])
def test_similarity_lse_with_index_names_its_argument(index, exc, match):
    """The trusted-index entry point still checks the index's type, dtype, shape and device, and
    its errors name ``index`` (anchored: the op's own check would name ``pos_index``)."""
    from fastcl.ops import similarity_lse_with_index
    with pytest.raises(exc, match=match):
        similarity_lse_with_index(q, k, 1.0, index=index)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_registered_ops_refuse_empty_inputs(backend):
    """torch.ops.fastcl.* are callable directly: an empty q or k is a clear error, not a kernel
    dividing by a zero tile count."""
    pytest.importorskip("fastcl._C")
    s, b = torch.tensor(1.0), torch.tensor(0.0)
    for qq, kk, name in ((q[:0], k, "q"), (q, k[:0], "k")):
        with pytest.raises(ValueError, match=f"{name} must be non-empty"):
            torch.ops.fastcl.similarity_lse_fwd(qq, kk, s, b, True, True, None, False, None, backend)
        with pytest.raises(ValueError, match=f"{name} must be non-empty"):
            torch.ops.fastcl.sigmoid_pair_bwd(qq, kk, s, b, s, qq.dtype, True, True, backend)
    # the C++ kernels themselves see no tiles: LSE over nothing is -inf, a sum over nothing 0
    row, col = torch.ops.fastcl_C.sim_lse_fwd(q[:0], k, 1.0, 0.0, True, True, None)
    assert row.shape == (0,) and (col == float("-inf")).all()
    assert torch.ops.fastcl_C.sigmoid_pair_fwd(q, k[:0], 1.0, 0.0).item() == 0.0


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_diagonal_offsets_beyond_the_matrix_exclude_nothing(backend):
    """Any int64 offset is accepted; one whose diagonal misses the matrix leaves every entry in
    (and never reaches the kernels' offset arithmetic, which could leave int64 at the extremes)."""
    if backend == "cpu":
        pytest.importorskip("fastcl._C")
    if backend == "triton":
        pytest.importorskip("triton")
    plain = similarity_lse(q, k, 1.0, rows=True, cols=True, backend=backend)
    for offset in (6, -5, 2**63 - 1, -2**63):
        out = similarity_lse(q, k, 1.0, rows=True, cols=True, exclude_diagonal=offset, backend=backend)
        for a, b in zip(out, plain):
            assert torch.equal(a, b), offset
    # offset 5 meets the matrix at (0, 5) only: row 0 changes, the other rows do not.  Entry (0, 5)
    # is made row 0's largest, so that leaving it out changes the fp32 LSE (a small one may not:
    # this failed on draws where it lay far below the row's maximum).
    k5 = torch.cat([k[:5], 3.0 * q[:1]])
    plain = similarity_lse(q, k5, 1.0, backend=backend)
    row_lse = similarity_lse(q, k5, 1.0, exclude_diagonal=5, backend=backend)
    assert row_lse[0] < plain[0] - 1.0 and torch.equal(row_lse[1:], plain[1:])


def test_fused_kernels_run_on_the_device_of_their_tensors(monkeypatch):
    """Triton launches on the current GPU, not the tensors' one: every fused call enters the
    device of its first tensor (cuda:1 here, while another device may be current)."""
    import types

    from fastcl.ops import dispatch
    entered = []

    class Recorder:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    kernel = dispatch.fused_kernel("op", "triton", {"triton": lambda t, x: ("ran", x)})
    on_gpu1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    assert kernel(on_gpu1, 3) == ("ran", 3) and entered == [torch.device("cuda", 1)]
    assert kernel(q, 4) == ("ran", 4) and len(entered) == 1  # CPU tensors: no device switch



def test_numpy_scalars_are_numbers():
    """A numpy float (from a config or a schedule) is a scale like any Python number."""
    np = pytest.importorskip("numpy")
    a, b = q, k[:5]
    assert torch.equal(fastcl.clip_loss(a, b, np.float32(14.0)), fastcl.clip_loss(a, b, 14.0))
    assert torch.equal(fastcl.ntxent_loss(a, b, np.float64(0.5)), fastcl.ntxent_loss(a, b, 0.5))
    assert torch.equal(fastcl.siglip_loss(a, b, np.float32(10.0), np.float32(-10.0)), fastcl.siglip_loss(a, b, 10.0, -10.0))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        fastcl.clip_loss(a, b, np.float32("inf"))
    assert torch.equal(fastcl.clip_loss(a, b, 14.0, label_smoothing=np.float32(0.25)),
                       fastcl.clip_loss(a, b, 14.0, label_smoothing=float(np.float32(0.25))))


_w = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5])


@pytest.mark.parametrize("call,exc,match", [
    # an (N, 1) weight would broadcast the positive term to (N, N) and average that
    (lambda: fastcl.dcl_loss(q, k[:5], weight_fn=lambda x, y: _w[:, None]), ValueError,
     r"weight_fn must return a scalar or \(5,\) tensor, got shape \(5, 1\)"),
    (lambda: fastcl.dcl_loss(q, k[:5], weight_fn=lambda x, y: [1.0] * 5), TypeError,
     "weight_fn must return a number or a tensor, got list"),
    # finite in float64, infinite in the float32 the loss computes in
    (lambda: similarity_lse(q, k, 1e39), ValueError, r"scale = 1e\+39 is outside the torch.float32 range"),
    (lambda: similarity_lse(q, k, torch.tensor(1e39, dtype=torch.float64), backend="reference"), ValueError,
     "scale = 1e"),
    (lambda: fastcl.siglip_loss(q, k, 1.0, -1e39), ValueError, "bias = -1e"),
    (lambda: fastcl.ntxent_loss(q, k[:5], 1e-45), ValueError, r"1 / temperature"),
    (lambda: fastcl.ntxent_loss_pml(q, torch.arange(5), temperature=1e-45), ValueError, r"1 / temperature = 1e\+45 is outside"),
    # the PML losses' zero-loss rule for tiny index tuples no longer skips the checks
    (lambda: fastcl.supcon_loss_pml(q, None, indices_tuple=tuple(torch.zeros(1) for _ in range(4))), TypeError,
     r"indices_tuple\[0\] \(a1\) must be an integer tensor"),
    (lambda: fastcl.ntxent_loss_pml(q, None, indices_tuple=tuple(torch.tensor(0) for _ in range(4))), ValueError,
     r"indices_tuple\[0\] \(a1\) must have shape"),
    (lambda: fastcl.ntxent_loss_pml(q, None, indices_tuple=(torch.tensor([9]),) * 4), ValueError,
     r"indices_tuple\[0\] \(a1\) must lie in \[0, 5\)"),
    (lambda: fastcl.nn.MemoryBank(8)(torch.randn(6), update=True), ValueError,
     r"output must be 2-D \(N, dim\), got shape \(6,\)"),
    (lambda: fastcl.nn.MemoryBank((8, 4))([1.0, 2.0], update=True), TypeError, "must be a torch.Tensor, got list"),
    (lambda: fastcl.random_masking(torch.zeros(2, 5, 3), 0.5, noise=torch.rand(2, 5),
                                   generator=torch.Generator()), ValueError, "noise or generator, not both"),
    (lambda: fastcl.random_masking(torch.zeros(2, 5, 3), 0.5, generator="x"), TypeError,
     "generator must be a torch.Generator"),
])
@pytest.mark.filterwarnings("ignore:memory_bank_size")
def test_more_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_dcl_with_one_pair_has_finite_gradients(backend):
    """N = 1: no negatives, a -inf loss as lightly's, and the positive term's finite gradient on
    every backend (torch's logaddexp of two -inf gave NaN in the fused backward)."""
    if backend == "cpu":
        pytest.importorskip("fastcl._C")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 6, generator=g, dtype=torch.float64), torch.randn(1, 6, generator=g, dtype=torch.float64)
    x, y = a.float().requires_grad_(), b.float().requires_grad_()
    loss = fastcl.dcl_loss(x, y, 0.5, backend=backend)
    loss.backward()
    assert loss.item() == float("-inf")
    # The oracle: only -pos / 2 per view carries gradient, pos = <a/|a|, b/|b|> / temperature.
    a64, b64 = a.clone().requires_grad_(), b.clone().requires_grad_()
    pos = (torch.nn.functional.normalize(a64, dim=1) * torch.nn.functional.normalize(b64, dim=1)).sum() / 0.5
    (-pos).backward()
    assert_close(x.grad, a64.grad, torch.float32, "dx", elementwise=True)
    assert_close(y.grad, b64.grad, torch.float32, "dy", elementwise=True)


def test_direct_op_calls_check_their_statistics_shapes():
    """The ops are callable directly (torch.ops.fastcl); statistics of the wrong length used to
    reach the Triton kernels, which read past them or used a (2,) scale's first element."""
    q, k, one = torch.randn(6, 4), torch.randn(7, 4), torch.tensor(1.0)
    z = torch.zeros
    lse_bwd = torch.ops.fastcl.similarity_lse_bwd
    cases = [
        (lambda: torch.ops.fastcl.similarity_lse_fwd(q, k, torch.ones(2), one, True, True, None, False, None,
                                                     "triton"), r"scale must be a one-element tensor, got \(2,\)"),
        (lambda: torch.ops.fastcl.similarity_lse_fwd(q, k, one, one, True, False, None, True, z(5, dtype=torch.long),
                                                     "triton"), r"pos_index must have shape \(6,\), got \(5,\)"),
        (lambda: lse_bwd(q, k, one, one, z(3), z(0), z(3), z(0), z(0), None, None, one, torch.float32, True, True,
                         "triton"), r"row_lse must have shape \(6,\) or \(0,\), got \(3,\)"),
        (lambda: lse_bwd(q, k, one, one, z(6, 1), z(0), z(6), z(0), z(0), None, None, one, torch.float32, True, True,
                         "triton"), r"row_lse must have shape \(6,\) or \(0,\), got \(6, 1\)"),
        (lambda: lse_bwd(q, k, one, one, z(6), z(7), z(6), z(6), z(0), None, None, one, torch.float32, True, True,
                         "triton"), r"g_col must have shape \(7,\), got \(6,\)"),
        (lambda: lse_bwd(q, k, one, one, z(6), z(0), z(6), z(0), z(5), None, None, one, torch.float32, True, True,
                         "triton"), r"g_pos must have shape \(6,\) or \(0,\), got \(5,\)"),
        (lambda: lse_bwd(q, k, one, one, z(6), z(0), z(6), z(0), z(0), None, None, z(2), torch.float32, True, True,
                         "triton"), r"grad_scale must be a one-element tensor, got \(2,\)"),
        (lambda: torch.ops.fastcl.sigmoid_pair_fwd(q, k, one, z(1, 2), "triton"),
         r"bias must be a one-element tensor, got \(1, 2\)"),
        (lambda: torch.ops.fastcl.sigmoid_pair_bwd(q, k, one, one, z(3), torch.float32, True, True, "triton"),
         r"grad_scale must be a one-element tensor, got \(3,\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_scalar_checks_do_not_read_values_under_torch_func():
    """A CPU tensor bias's value is read for the finiteness check, but not inside torch.func
    transforms, which cannot read one (vmap over a bias worked before that check existed)."""
    gen = torch.Generator().manual_seed(3)
    q, k, biases = torch.randn(5, 4, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(3, generator=gen)
    out = torch.func.vmap(lambda b: similarity_lse(q, k, 2.0, b, backend="reference"))(biases)
    ref = torch.stack([similarity_lse(q, k, 2.0, b, backend="reference") for b in biases])
    assert_close(out, ref, torch.float32)


def _meta():
    return torch.tensor(2.0, device="meta")


@pytest.mark.parametrize("call,name", [
    (lambda m: fastcl.clip_loss(q, q, m), "logit_scale"),
    (lambda m: fastcl.clip_loss(q, q, 2.0, logit_bias=m), "logit_bias"),
    (lambda m: fastcl.siglip_loss(q, q, m), "logit_scale"),
    (lambda m: fastcl.siglip_loss(q, q, 2.0, m), "logit_bias"),
    (lambda m: fastcl.info_nce(q, k, temperature=m), "temperature"),
    (lambda m: fastcl.info_nce(q, k, logit_scale=m), "logit_scale"),
    (lambda m: fastcl.ntxent_loss(q, q, m), "temperature"),
    (lambda m: fastcl.dcl_loss(q, q, m), "temperature"),
    (lambda m: fastcl.supcon_loss(q[:, None], temperature=m), "temperature"),
    (lambda m: fastcl.supcon_loss(q[:, None], base_temperature=m), "base_temperature"),
    (lambda m: fastcl.supcon_loss_pml(q, torch.arange(5) % 2, temperature=m), "temperature"),
    (lambda m: fastcl.ntxent_loss_pml(q, torch.arange(5) % 2, temperature=m), "temperature"),
    (lambda m: fastcl.triplet_margin_loss_pml(q, torch.arange(5) % 2, margin=m), "margin"),
    (lambda m: fastcl.contrastive_loss_pml(q, torch.arange(5) % 2, pos_margin=m), "pos_margin"),
    (lambda m: fastcl.hypersphere_loss(q, q, t=m), "t"),
    (lambda m: fastcl.hypersphere_loss(q, q, lam=m), "lam"),
    (lambda m: fastcl.macl_loss(q, q, m), "temperature"),
    (lambda m: fastcl.macl_loss(q, q, 0.1, a_0=m * 0), "a_0"),
    (lambda m: fastcl.distill_clip_loss(q, q, 2.0, q, q, m), "dist_logit_scale"),
    (lambda m: similarity_lse(q, k, m), "scale"),
    (lambda m: fastcl.ops.sigmoid_pair_loss(q, k, 2.0, m), "bias"),
    (lambda m: fastcl.nn.ClipLoss()(q, q, m), "logit_scale"),
    (lambda m: fastcl.nn.CoCaLoss(m, 1.0)(q, q, torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.long), 2.0),
     "caption_loss_weight"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_scalar_on_another_device_names_it(call, name, backend, monkeypatch):
    """A scale, bias, temperature or weight tensor on another device than the inputs (meta stands
    in for one: there is no GPU here) is an error naming it, on every backend.  It used to be
    torch's unnamed device error, a meta result, or an `.item()` failure."""
    monkeypatch.setenv("FASTCL_BACKEND", backend)
    with pytest.raises(ValueError, match=rf"^{name} must be on the inputs' device \(cpu\), got meta"):
        call(_meta())


def test_one_element_scalars_keep_losses_0d():
    """A (1,) weight is a scalar (as a (1,) logit_scale is): the loss stays 0-d.  hypersphere's lam
    and CoCa's weights used to make it (1,)."""
    one = torch.tensor([0.5])
    assert fastcl.hypersphere_loss(q, q, lam=one).shape == ()
    assert fastcl.hypersphere_loss(q, q, t=one, alpha=torch.tensor([2.0])).shape == ()
    logits, labels = torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.long)
    outs = fastcl.nn.CoCaLoss(one, one)(q, q, logits, labels, 2.0)
    assert [o.shape for o in outs] == [(), ()]
    lam = torch.tensor([0.5], requires_grad=True)
    fastcl.hypersphere_loss(q, q, lam=lam).backward()
    assert lam.grad is not None and lam.grad.shape == (1,)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fastcl.clip_loss(q.to_sparse(), q, 2.0), TypeError, "image_features must be a dense .* layout torch.sparse_coo"),
    (lambda: fastcl.clip_loss(q, q.to_sparse_csr(), 2.0), TypeError, "text_features must be a dense .* torch.sparse_csr"),
    (lambda: similarity_lse(torch.nested.nested_tensor([q, q[:2]]), k, 2.0), TypeError, "q must be a dense .* nested"),
    (lambda: fastcl.clip_loss(q, k, 2.0, labels=torch.arange(5).to_sparse()), TypeError, "labels must be a dense"),
    (lambda: fastcl.supcon_loss(q[:, None], labels=torch.arange(5).to_sparse()), TypeError, "labels must be a dense"),
    (lambda: fastcl.supcon_loss(q[:, None], mask=torch.eye(5).to_sparse()), TypeError, "mask must be a dense"),
    (lambda: fastcl.supcon_loss(q[:, None], mask=torch.eye(5, dtype=torch.complex64)), TypeError,
     "mask must be a real .* got torch.complex64"),
    (lambda: fastcl.gather_tokens(torch.randn(2, 5, 3).to_sparse(), torch.zeros(2, 2, dtype=torch.long)), TypeError,
     "x must be a dense"),
    (lambda: fastcl.nn.MemoryBank(8)(torch.ones(4, 3, dtype=torch.long), update=True), TypeError,
     "output must be float32"),
    (lambda: fastcl.nn.MemoryBank(8)(torch.randn(4, 0), update=True), ValueError, "output must have dim >= 1"),
    (lambda: fastcl.ntxent_loss(q, q, torch.tensor(1e-40)), ValueError,
     r"scale must be finite \(the temperature losses pass scale = 1 / temperature\)"),
    (lambda: fastcl.ntxent_loss_pml(q, torch.arange(5) % 2, temperature=torch.tensor(1e-40)), ValueError,
     r"1 / temperature = 1\.0+1e\+40 is outside"),
    (lambda: fastcl.macl_loss(q, q, 0.1, a_0=torch.tensor([0.5, 0.5])), ValueError, r"a_0 must be a scalar"),
    (lambda: fastcl.macl_loss(q, q, 0.1, a_0=2.0), ValueError, r"a_0 must be in \[0, 1\]"),
    (lambda: fastcl.nn.MACLLoss(A_0=2.0), ValueError, r"A_0 must be in \[0, 1\]"),
])
@pytest.mark.filterwarnings("ignore:memory_bank_size")
@pytest.mark.filterwarnings("ignore:.*(Sparse CSR|nested tensors).*:UserWarning")
def test_layouts_dtypes_and_ranges_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _direct_ops(device_of):
    """Calls of the registered ops with one argument from ``device_of(name, tensor)``."""
    s, b = torch.tensor(2.0), torch.tensor(0.5)
    row, col = torch.randn(5), torch.randn(6)
    g = torch.randn(5)
    return [
        ("scale", lambda: torch.ops.fastcl.sigmoid_pair_fwd(q, k, device_of("scale", s), b, "cpu")),
        ("bias", lambda: torch.ops.fastcl.similarity_lse_fwd(q, k, s, device_of("bias", b), True, False, None, False,
                                                             None, "cpu")),
        ("pos_index", lambda: torch.ops.fastcl.similarity_lse_fwd(
            q, k, s, b, True, False, None, True, device_of("pos_index", torch.arange(5)), "cpu")),
        ("row_lse", lambda: torch.ops.fastcl.similarity_lse_bwd(
            q, k, s, b, device_of("row_lse", row), col, g, torch.randn(6), torch.randn(0), None, None, s,
            torch.float32, True, True, "cpu")),
        ("grad_scale", lambda: torch.ops.fastcl.sigmoid_pair_bwd(q, k, s, b, device_of("grad_scale", s), torch.float32,
                                                                 True, True, "cpu")),
    ]


@pytest.mark.parametrize("case", range(5))
def test_direct_ops_refuse_an_argument_on_another_device(case):
    """One meta argument among CPU tensors sends the call to the op's fake kernel, which used to
    hand back uninitialised CPU memory as the loss; it now checks devices as the real one does."""
    name, call = _direct_ops(lambda n, t: t.to("meta"))[case]
    with pytest.raises(ValueError, match=f"{name} must be on cpu, got meta"):
        call()
    name, call = _direct_ops(lambda n, t: t)[case]
    call()  # the same call on one device runs


def test_direct_op_pos_index_must_be_integer():
    with pytest.raises(TypeError, match="pos_index must be an int64 or int32 tensor, got torch.float32"):
        torch.ops.fastcl.similarity_lse_fwd(q, k, torch.tensor(2.0), torch.tensor(0.0), True, False, None, True,
                                            torch.zeros(5), "cpu")


def test_more_argument_kinds_name_the_argument():
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="rows must be a bool, got numpy.bool"):
        similarity_lse(q, k, 2.0, rows=np.bool_(True))
    with pytest.raises(ValueError, match="pad_id must fit in int64, got 1180591620717411303424"):
        fastcl.caption_loss(torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.long), pad_id=2**70)
    with pytest.raises(ValueError, match=r"weight_fn must return a tensor on the inputs' device \(cpu\), got meta"):
        fastcl.dcl_loss(q, q, 0.1, weight_fn=lambda a, b: torch.ones(5, device="meta"))
    fastcl.dcl_loss(q, q, 0.1, weight_fn=lambda a, b: torch.tensor(2.0))  # a CPU scalar serves any device


def test_cross_batch_memory_refuses_labels_of_another_kind():
    """Float labels stored, integer labels next: converting the memory (as PML does) would turn
    the stored 0.5, 1.5, ... into 0, 1, ... and silently merge them with the new classes."""
    m = fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), 8, 16)
    m(torch.randn(4, 8), torch.tensor([0.5, 1.5, 2.5, 3.5]))
    with pytest.raises(ValueError, match="labels are torch.int64, but the memory holds torch.float32 labels"):
        m(torch.randn(4, 8), torch.arange(4))
    m.reset_queue()
    m(torch.randn(4, 8), torch.arange(4))  # a fresh queue takes either kind
    m(torch.randn(4, 8), torch.arange(4, dtype=torch.int32))  # integer widths mix losslessly


def test_distill_teacher_must_be_fixed_and_on_the_students_device():
    """The teacher is a constant: a dist_logit_scale (or a dist_text_features alone) that requires
    grad is refused by name, as dist_image_features is; a teacher on another device (meta stands
    in for a GPU) is named too, not torch's unnamed device error."""
    g = torch.Generator().manual_seed(51)
    x, t = torch.randn(7, 9, generator=g), torch.randn(7, 5, generator=g)
    with pytest.raises(ValueError, match="dist_logit_scale must not require grad"):
        fastcl.distill_clip_loss(x, x, 2.0, t, t, torch.tensor(1.0, requires_grad=True))
    with pytest.raises(ValueError, match="dist_text_features must not require grad"):
        fastcl.distill_clip_loss(x, x, 2.0, t, t.clone().requires_grad_(), 1.0)
    with pytest.raises(ValueError, match="dist_image_features must be on cpu, got meta"):
        fastcl.distill_clip_loss(x, x, 2.0, t.to("meta"), t.to("meta"), 1.0)


def test_macl_ranges_include_their_bounds_only():
    """lightly's MACLLoss: A_0 in [0, 1] and temperature >= 1e-8, bounds included; just past
    either is a ValueError naming the argument."""
    with pytest.raises(ValueError, match=r"A_0 must be in \[0, 1\], got 1.5"):
        fastcl.nn.MACLLoss(A_0=1.5)
    with pytest.raises(ValueError, match="temperature must be at least 1e-08, got 1e-09"):
        fastcl.nn.MACLLoss(temperature=1e-9)
    with pytest.raises(ValueError, match=r"a_0 must be in \[0, 1\], got -0.5"):
        fastcl.macl_loss(q, q, 0.1, a_0=-0.5)
    fastcl.nn.MACLLoss(A_0=1.0)
    fastcl.nn.MACLLoss(temperature=1e-8)
    assert torch.isfinite(fastcl.macl_loss(q, q.flip(0), 1e-8, a_0=1.0))


def test_direct_ops_name_a_missing_cuda_build(monkeypatch):
    """torch.ops.fastcl.* take any backend name: "cuda" on a build without the CUDA kernels is an
    error that says so (it was an AttributeError about torch.ops.fastcl_C)."""
    import types

    import fastcl.ops.strips as strips
    monkeypatch.setattr(strips, "EPILOGUES", strips.CudaEpilogues)  # the real ones, whatever a test swapped in
    monkeypatch.setattr(torch.ops, "fastcl_C", types.SimpleNamespace())  # a build without them, on any machine
    with pytest.raises(RuntimeError, match="backend='cuda' needs fastcl built with its CUDA kernels"):
        torch.ops.fastcl.sigmoid_pair_fwd(q, k, torch.tensor(2.0), torch.tensor(0.0), "cuda")


@pytest.mark.parametrize("scale", [torch.tensor(10.0), torch.tensor([10.0])])
def test_cpu_scalars_serve_inputs_on_another_device(scale):
    """The allowed direction: a 0-d or (1,) CPU scale, temperature or bias with inputs on another
    device (meta stands in for a GPU) gives a 0-d loss there.  A (1,) CPU tensor used to reach
    device arithmetic as is, which torch refuses (it mixes only 0-d CPU tensors in)."""
    a, b = torch.randn(8, 16, device="meta"), torch.randn(8, 16, device="meta")
    for call in (lambda: fastcl.clip_loss(a, b, scale, backend="reference"),
                 lambda: fastcl.clip_loss(a, b, scale, logit_bias=scale, label_smoothing=0.1, backend="reference"),
                 lambda: fastcl.siglip_loss(a, b, scale, -scale, backend="reference"),
                 lambda: fastcl.ntxent_loss(a, b, 1 / scale, backend="reference"),
                 lambda: fastcl.dcl_loss(a, b, 1 / scale, backend="reference"),
                 lambda: fastcl.supcon_loss(a[:, None], temperature=1 / scale, backend="reference"),
                 lambda: fastcl.info_nce(a, b, logit_scale=scale, backend="reference"),
                 lambda: similarity_lse(a, b, scale, bias=scale, backend="reference"),
                 lambda: fastcl.ops.sigmoid_pair_loss(a, b, scale, scale, backend="reference")):
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        assert out.device.type == "meta"


def test_supcon_moves_cpu_labels_and_mask_to_the_features():
    """SupContrast moves labels and mask to the features' device (``.to(device)``), so CPU labels
    with GPU features work there; meta stands in for the GPU.  The other direction is refused."""
    f = torch.randn(6, 2, 4, device="meta")
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    for out in (fastcl.supcon_loss(f, labels=labels), fastcl.supcon_loss(f, mask=torch.eye(6)),
                fastcl.nn.SupConLoss()(f, labels), fastcl.nn.SupConLoss()(f, None, torch.eye(6) > 0)):
        assert out.device.type == "meta" and out.shape == ()
    with pytest.raises(ValueError, match="labels must be on cpu, got meta"):
        fastcl.supcon_loss(torch.randn(6, 2, 4), labels=labels.to("meta"))
    with pytest.raises(ValueError, match="mask must be on cpu, got meta"):
        fastcl.supcon_loss(torch.randn(6, 2, 4), mask=torch.eye(6, device="meta"))


def test_cross_batch_memory_keeps_its_label_width():
    """int64 classes stored, an int32 batch next: the memory stays int64 (PML's stays long), so
    2**40 is not wrapped into 0 and merged with class 0."""
    m = fastcl.nn.pml.CrossBatchMemory(fastcl.nn.pml.NTXentLoss(), 8, 16)
    m(torch.randn(4, 8), torch.tensor([2**40, 2**40, 1, 1]))
    m(torch.randn(4, 8), torch.tensor([3, 3, 1, 1], dtype=torch.int32))
    assert m.label_memory.dtype == torch.int64
    assert m.label_memory[:8].tolist() == [2**40, 2**40, 1, 1, 3, 3, 1, 1]


def test_ntxent_pml_refuses_a_float64_subnormal_temperature():
    x = torch.randn(5, 8, dtype=torch.float64)
    for t in (5e-324, torch.tensor(5e-324, dtype=torch.float64)):
        with pytest.raises(ValueError, match="1 / temperature = inf is outside"):
            fastcl.ntxent_loss_pml(x, torch.arange(5) % 2, temperature=t)


def test_distill_clip_loss_names_any_row_count_that_differs():
    """Each of the four feature tensors with one row fewer than the others is refused by name
    (the student text's and the teacher text's rows are not covered by check_pair, which checks D)."""
    x, t = torch.randn(6, 8), torch.randn(6, 5)
    for args in ((x, x[:5], t, t), (x, x, t[:5], t), (x, x, t, t[:5])):
        with pytest.raises(ValueError, match="must have the same number of rows"):
            fastcl.distill_clip_loss(args[0], args[1], 2.0, args[2], args[3], 1.0)


@pytest.mark.parametrize("text", ["abc", "-3", "1.5"])
def test_test_seed_names_its_variable(text):
    """A mistyped FASTCL_TEST_SEED fails by name, not as int()'s bare ValueError."""
    from conftest import seed_base
    with pytest.raises(ValueError, match="FASTCL_TEST_SEED must be a non-negative integer"):
        seed_base(text)
    assert seed_base("42") == 42 and 1 <= seed_base("") < 2**31 and 1 <= seed_base(None) < 2**31
