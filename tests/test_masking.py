"""Token masking (issue 5): every backend against an MAE-style oracle written here.

Gathers and their unique-index backwards are copies, so they must match bit for bit; only sums
of several terms (repeated indices, the mask-token gradient) are compared with the tolerance."""
import re

import pytest
import torch

import _cuda_host
from conftest import DTYPES, assert_close, randn
from fastcl._ext import extension_available, extension_has_cuda
from fastcl.masking import gather_tokens, random_masking, restore_tokens
from fastcl.nn.masking import RandomMasking, RestoreTokens
from fastcl.ops.dispatch import triton_available

HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["reference"]
if extension_available():
    BACKENDS.append("cpu")
if triton_available():
    BACKENDS.append("triton")
# Without a GPU, backend="cuda" runs the CUDA kernel compiled for the CPU (tests/_cuda_host.py).
CUDA_ON_HOST = not HAS_CUDA and _cuda_host.compiler() is not None
if (HAS_CUDA and extension_has_cuda()) or CUDA_ON_HOST:
    BACKENDS.append("cuda")


@pytest.fixture(autouse=True)
def _cuda_kernel_on_the_host(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if CUDA_ON_HOST and callspec is not None and callspec.params.get("backend") == "cuda":
        _cuda_host.route_to_host(monkeypatch)


def device_of(backend: str) -> str:
    # Triton runs on CUDA tensors when there is a GPU, else in the interpreter on the CPU.
    return "cuda" if backend in ("triton", "cuda") and HAS_CUDA else "cpu"


# ---- the oracle: MAE's recipe (argsort noise, gather with a repeated (B, K, D) index) ----------

def oracle_masking(x, ratio, noise):
    n, length, d = x.shape
    keep = int(length * (1 - ratio))
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    kept_ids = shuffle[:, :keep]
    kept = torch.gather(x, 1, kept_ids.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    return kept, mask, restore, kept_ids


def oracle_restore(kept, token, restore):
    n, keep, d = kept.shape
    length = restore.shape[1]
    tokens = token.reshape(1, 1, d).repeat(n, length - keep, 1)
    full = torch.cat([kept, tokens], dim=1)
    return torch.gather(full, 1, restore.unsqueeze(-1).repeat(1, 1, d))


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- random_masking -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [3, 129])
def test_random_masking_matches_mae(backend, dtype, D):
    dev = device_of(backend)
    g = gen(D)
    # L = 17 takes torch's sort for the indices on every backend, L = 67 the rank kernel on
    # the GPU backends (fastcl.ops.masking.RANK_MIN_L).
    B, L, ratio = 3, 17 if D == 3 else 67, 0.75
    x = randn(B, L, D, dtype=dtype, device=dev, generator=g)
    noise = torch.rand(B, L, generator=g).to(dev)
    x1, x2 = leaf(x), leaf(x)
    kept, mask, restore, ids_keep = random_masking(x1, ratio, noise=noise, backend=backend)
    r_kept, r_mask, r_restore, r_keep = oracle_masking(x2, ratio, noise)
    assert kept.shape == (B, int(L * 0.25), D) and kept.dtype == dtype
    assert torch.equal(kept, r_kept)
    assert torch.equal(mask, r_mask) and mask.dtype == r_mask.dtype
    assert torch.equal(restore, r_restore) and torch.equal(ids_keep, r_keep)
    up = randn(*kept.shape, dtype=dtype, device=dev, generator=g)
    kept.backward(up)
    r_kept.backward(up)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.999])
def test_random_masking_ratios(backend, ratio):
    dev = device_of(backend)
    g = gen(int(ratio * 1000))
    L = 41  # over RANK_MIN_L: the GPU backends' rank kernel, keeping 41, 20, 4 and 0 tokens
    x = randn(2, L, 5, device=dev, generator=g)
    noise = torch.rand(2, L, generator=g).to(dev)
    x1, x2 = leaf(x), leaf(x)
    out = random_masking(x1, ratio, noise=noise, backend=backend)
    ref = oracle_masking(x2, ratio, noise)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    keep = int(L * (1 - ratio))
    assert out[0].shape[1] == keep and int(out[1].sum()) == 2 * (L - keep)
    up = randn(*out[0].shape, device=dev, generator=g)
    (out[0] * up).sum().backward()
    (ref[0] * up).sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    if keep == 0:
        assert torch.equal(x1.grad, torch.zeros_like(x1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_shape", ["LD", "1LD"])
def test_random_masking_fused_pos_embed(backend, dtype, pos_shape):
    dev = device_of(backend)
    g = gen(7)
    B, L, D = 4, 13, 129
    x = randn(B, L, D, dtype=dtype, device=dev, generator=g)
    pos = randn(L, D, dtype=dtype, device=dev, generator=g)
    if pos_shape == "1LD":
        pos = pos[None]
    noise = torch.rand(B, L, generator=g).to(dev)
    x1, p1, x2, p2 = leaf(x), leaf(pos), leaf(x), leaf(pos)
    kept, *_ = random_masking(x1, 0.6, noise=noise, pos_embed=p1, backend=backend)
    r_kept, _, _, r_keep = oracle_masking(x2 + p2, 0.6, noise)
    assert torch.equal(kept, r_kept)  # one rounding of x + pos in both
    up = randn(*kept.shape, dtype=dtype, device=dev, generator=g)
    kept.backward(up)
    r_kept.backward(up)
    assert torch.equal(x1.grad, x2.grad)
    assert p1.grad.shape == pos.shape
    # float64 oracle: each kept token's upstream row lands on its position, summed over the batch
    g64 = torch.zeros(B, L, D, dtype=torch.float64, device=dev)
    g64.scatter_(1, r_keep[..., None].expand(-1, -1, D), up.double())
    assert_close(p1.grad, g64.sum(0).reshape(pos.shape), dtype, "d pos_embed")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype, other_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                  (torch.float16, torch.float64)])
def test_mixed_dtypes_promote_as_mae(backend, x_dtype, other_dtype):
    """An fp32 pos_embed or mask token with bf16 tokens (MAE under autocast): x + pos_embed and
    cat([x, mask_tokens]) follow torch's type promotion, and so do both ops, bit for bit."""
    dev = device_of(backend)
    g = gen(11)
    B, L, D, ratio = 3, 14, 129, 0.7
    x = randn(B, L, D, dtype=x_dtype, device=dev, generator=g)
    pos = randn(1, L, D, dtype=other_dtype, device=dev, generator=g)
    noise = torch.rand(B, L, generator=g).to(dev)
    x1, p1, x2, p2 = leaf(x), leaf(pos), leaf(x), leaf(pos)
    kept, *_ = random_masking(x1, ratio, noise=noise, pos_embed=p1, backend=backend)
    r_kept, _, restore, r_keep = oracle_masking(x2 + p2, ratio, noise)
    assert kept.dtype == r_kept.dtype == torch.promote_types(x_dtype, other_dtype)
    assert torch.equal(kept, r_kept)
    up = randn(*kept.shape, dtype=kept.dtype, device=dev, generator=g)
    kept.backward(up)
    r_kept.backward(up)
    assert x1.grad.dtype == x_dtype and torch.equal(x1.grad, x2.grad)
    g64 = torch.zeros(B, L, D, dtype=torch.float64, device=dev)
    g64.scatter_(1, r_keep[..., None].expand(-1, -1, D), up.double())
    assert p1.grad.dtype == other_dtype
    assert_close(p1.grad, g64.sum(0, keepdim=True), other_dtype, "d pos_embed")

    keep = r_kept.shape[1]
    kept_x = randn(B, keep, D, dtype=x_dtype, device=dev, generator=g)
    token = randn(1, 1, D, dtype=other_dtype, device=dev, generator=g)
    k1, t1, k2, t2 = leaf(kept_x), leaf(token), leaf(kept_x), leaf(token)
    out = restore_tokens(k1, t1, restore, backend=backend)
    ref = oracle_restore(k2, t2, restore)
    assert out.dtype == ref.dtype == torch.promote_types(x_dtype, other_dtype) and torch.equal(out, ref)
    up = randn(B, L, D, dtype=out.dtype, device=dev, generator=g)
    out.backward(up)
    ref.backward(up)
    assert k1.grad.dtype == x_dtype and torch.equal(k1.grad, k2.grad)
    removed = (restore >= keep)[..., None]
    assert t1.grad.dtype == other_dtype
    assert_close(t1.grad, (up.double() * removed).sum((0, 1), keepdim=True), other_dtype, "d mask_token")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_stride", "feature_stride", "batch_slice"])
def test_random_masking_non_contiguous(backend, layout):
    dev = device_of(backend)
    g = gen(3)
    if layout == "row_stride":      # every other token: stride(1) = 2 * D
        x = randn(3, 22, 7, device=dev, generator=g)[:, ::2]
    elif layout == "feature_stride":  # D not unit-stride
        x = randn(3, 7, 11, device=dev, generator=g).transpose(1, 2)
    else:                            # offset storage and batch stride
        x = randn(6, 11, 9, device=dev, generator=g)[1::2, :, 1:8]
    noise = torch.rand(x.shape[0], x.shape[1], generator=g).to(dev)
    assert not x.is_contiguous()
    x1, x2 = leaf(x), leaf(x)
    kept = random_masking(x1, 0.4, noise=noise, backend=backend)[0]
    r_kept = oracle_masking(x2, 0.4, noise)[0]
    assert torch.equal(kept, r_kept)
    up = randn(*kept.shape, device=dev, generator=g)
    kept.backward(up)
    r_kept.backward(up)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_masking_nan_and_generator(backend):
    dev = device_of(backend)
    x = randn(2, 9, 4, device=dev, generator=gen(0))
    x[0, :, 1] = float("nan")
    kept, mask, restore, ids_keep = random_masking(x, 0.5, generator=torch.Generator(dev).manual_seed(5),
                                                   backend=backend)
    assert torch.isnan(kept[0, :, 1]).all() and not torch.isnan(kept[1]).any()
    again = random_masking(x, 0.5, generator=torch.Generator(dev).manual_seed(5), backend=backend)
    assert torch.equal(again[3], ids_keep)
    # Each row keeps distinct tokens, and the mask marks exactly the others.
    assert all(len(set(r.tolist())) == 4 for r in ids_keep)
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros_like(ids_keep, dtype=mask.dtype))


# ---- the index tensors: the rank kernels of the GPU backends ------------------------------------

INDEX_KERNELS = [b for b in ("triton", "cuda") if b in BACKENDS]


def stable_sort_indices(noise, keep):
    """(ids_restore, ids_keep) of a stable ascending sort in float64 with NaN last: what torch's
    CUDA sort gives rows of more than 32 (the CPU sort may order ties either way)."""
    key = noise.double()
    nan = torch.isnan(key)
    order = torch.argsort(torch.where(nan, torch.zeros_like(key), key), dim=1, stable=True)
    order = order.gather(1, torch.argsort(nan.gather(1, order).to(torch.int8), dim=1, stable=True))
    return torch.argsort(order, dim=1), order[:, :keep]


def index_kernel(backend):
    from fastcl.ops import masking as ops_masking
    return lambda noise, keep, mask_dtype: ops_masking._mask_indices(noise, keep, mask_dtype, backend)


NOISE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Every noise dtype at three row lengths (none, some and all tokens kept); RANK_MAX_L once (4 s
# in the interpreter).
INDEX_CASES = [(dt, L, keep) for dt in NOISE_DTYPES for L, keep in ((33, 8), (67, 0), (131, 131))]
INDEX_CASES.append((torch.float32, 1024, 255))


@pytest.mark.parametrize("backend", INDEX_KERNELS)
@pytest.mark.parametrize("noise_dtype, L, keep", INDEX_CASES)
def test_index_kernel_ranks_like_a_stable_sort(backend, noise_dtype, L, keep):
    """Ties (coarse noise), NaN, -0.0 against 0.0 and a strided noise tensor: the kernel's ranks
    are those of a stable sort, every output element is written (the host build poisons them)."""
    dev = device_of(backend)
    g = gen(L + keep)
    B = 3 if L < 1024 else 2
    noise = (torch.randint(0, 9, (L, B), generator=g) / 8).to(noise_dtype).t()  # strides (1, B)
    noise[0, 3] = noise[0, L - 1] = noise[1, 0] = float("nan")
    noise[1, 5], noise[1, 7], noise[2 % B, 1] = -0.0, 0.0, float("-inf")
    noise = noise.to(dev)
    mask_dtype = torch.float64 if noise_dtype == torch.float64 else torch.float32
    ids_restore, ids_keep, mask = index_kernel(backend)(noise, keep, mask_dtype)
    r_restore, r_keep = stable_sort_indices(noise.cpu(), keep)
    assert torch.equal(ids_restore.cpu(), r_restore) and torch.equal(ids_keep.cpu(), r_keep)
    assert mask.dtype == mask_dtype and torch.equal(mask.cpu(), (r_restore >= keep).to(mask_dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_index_kernel_mask_needs_no_grad(backend):
    """A noise tensor that requires grad: the index tensors carry no autograd history (the
    CUDA op has no autograd kernel, so torch would give its float mask a failing grad_fn)."""
    if backend == "cuda" and not extension_has_cuda():
        pytest.skip("fastcl._C built without CUDA")
    noise = torch.rand(2, 40, device="cuda").requires_grad_()
    ids_restore, ids_keep, mask = index_kernel(backend)(noise, 10, torch.float32)
    assert not mask.requires_grad and mask.grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_path_by_row_length(backend, monkeypatch):
    """The rank kernel serves the GPU backends from RANK_MIN_L to RANK_MAX_L tokens; shorter rows
    (where torch's CUDA sort is unstable), longer ones and the other backends take torch.argsort.
    Both paths give MAE's tensors."""
    from fastcl.ops import masking as ops_masking
    calls = []
    kernel = ops_masking._mask_indices
    monkeypatch.setattr(ops_masking, "_mask_indices", lambda *a: calls.append(a[0].shape[1]) or kernel(*a))
    dev = device_of(backend)
    g = gen(11)
    for L in (ops_masking.RANK_MIN_L - 1, ops_masking.RANK_MIN_L, ops_masking.RANK_MAX_L + 1):
        x = randn(2, L, 3, device=dev, generator=g)
        noise = torch.rand(2, L, generator=g).to(dev)
        out = random_masking(x, 0.5, noise=noise, backend=backend)
        for a, b in zip(out, oracle_masking(x, 0.5, noise)):
            assert torch.equal(a, b)
    assert calls == ([ops_masking.RANK_MIN_L] if backend in INDEX_KERNELS else [])


# ---- gather_tokens ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_tokens_repeated_indices(backend, dtype):
    dev = device_of(backend)
    g = gen(11)
    B, L, K, D = 3, 6, 14, 129   # K > L forces repeats; some tokens are never picked
    x = randn(B, L, D, dtype=dtype, device=dev, generator=g)
    ids = torch.randint(0, L - 1, (B, K), generator=g).to(dev)
    x1 = leaf(x)
    out = gather_tokens(x1, ids, backend=backend)
    assert torch.equal(out, torch.gather(x, 1, ids[..., None].repeat(1, 1, D)))
    up = randn(B, K, D, dtype=dtype, device=dev, generator=g)
    out.backward(up)
    ref = torch.zeros(B, L, D, dtype=torch.float64, device=dev)
    for b in range(B):
        ref[b].index_add_(0, ids[b], up[b].double())
    assert_close(x1.grad, ref, dtype, "index_add backward")
    assert torch.equal(x1.grad[:, L - 1], torch.zeros_like(x1.grad[:, L - 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_tokens_int32_and_strided_ids(backend):
    dev = device_of(backend)
    g = gen(2)
    x = randn(2, 8, 3, device=dev, generator=g)
    ids = torch.randint(0, 8, (2, 10), generator=g).to(dev)[:, ::2].to(torch.int32)
    out = gather_tokens(x, ids, backend=backend)
    assert torch.equal(out, torch.gather(x, 1, ids.long()[..., None].expand(-1, -1, 3)))


# ---- restore_tokens -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_shape", ["D", "11D"])
def test_restore_tokens_matches_mae(backend, dtype, token_shape):
    dev = device_of(backend)
    g = gen(5)
    B, L, D, keep = 3, 15, 129, 4
    noise = torch.rand(B, L, generator=g).to(dev)
    restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    kept = randn(B, keep, D, dtype=dtype, device=dev, generator=g)
    token = randn(D, dtype=dtype, device=dev, generator=g)
    if token_shape == "11D":
        token = token.reshape(1, 1, D)
    k1, t1, k2, t2 = leaf(kept), leaf(token), leaf(kept), leaf(token)
    out = restore_tokens(k1, t1, restore, backend=backend)
    ref = oracle_restore(k2, t2, restore)
    assert out.shape == (B, L, D) and torch.equal(out, ref)
    up = randn(B, L, D, dtype=dtype, device=dev, generator=g)
    out.backward(up)
    ref.backward(up)
    assert torch.equal(k1.grad, k2.grad)
    assert t1.grad.shape == token.shape
    # float64 oracle: the upstream rows of every removed position (restore index >= keep), summed
    removed = (restore >= keep)[..., None]
    assert_close(t1.grad, (up.double() * removed).sum((0, 1)).reshape(token.shape), dtype, "d mask_token")


def _masking_ops(backend, ids_keep, ids_restore, noise, token_of=None):
    """The three ops as functions of (x, extra): gather_tokens, random_masking with pos_embed
    ``extra``, restore_tokens of x's first K tokens with mask token ``extra``."""
    keep = ids_keep.shape[1]
    return {
        "gather": lambda x, extra: gather_tokens(x, ids_keep, backend=backend) * extra.sum(),
        "mask": lambda x, extra: random_masking(x, 1 - keep / x.shape[1] - 1e-9, noise=noise, pos_embed=extra,
                                                backend=backend)[0],
        "restore": lambda x, extra: restore_tokens(x[:, :keep], extra[0, 0], ids_restore, backend=backend),
    }


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("op", ["gather", "mask", "restore"])
def test_second_derivatives_and_torch_func(backend, op):
    """Double backward (create_graph=True), torch.func.grad and its nesting, vmap and vmap over
    grad, against the reference backend, in float64 (the Triton kernels take fp32).  The fused
    backwards used to be opaque kernel calls: a second derivative through them came back as zeros
    with only torch's warning, and torch.func refused the Functions."""
    dev = device_of(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    g = gen(13)
    B, L, D, keep = 2, 9, 5, 4
    x = randn(B, L, D, dtype=dtype, device=dev, generator=g)
    extra = randn(1, L, D, dtype=dtype, device=dev, generator=g)
    noise = torch.rand(B, L, generator=g).to(dev)
    ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    ids_keep = torch.tensor([[0, 3, 3, 8], [5, 1, 0, 5]], device=dev)  # repeats, for the gather
    w = randn(B, L if op == "restore" else keep, D, dtype=dtype, device=dev, generator=g)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)

    def results(backend):
        fn = _masking_ops(backend, ids_keep, ids_restore, noise)[op]
        loss = lambda x, e: ((fn(x, e) * w) ** 2).sum()  # noqa: E731
        x1, e1 = leaf(x), leaf(extra)
        g1 = torch.autograd.grad(loss(x1, e1), (x1, e1), create_graph=True)
        second = torch.autograd.grad(sum((t * t).sum() for t in g1), (x1, e1))
        func_grad = torch.func.grad(loss, argnums=(0, 1))(x, extra)
        func_second = torch.func.grad(lambda x, e: sum((t * t).sum() for t in torch.func.grad(
            loss, argnums=(0, 1))(x, e)))(x, extra)
        xs = torch.stack([x, 2 * x, -x])
        batched = torch.func.vmap(fn, in_dims=(0, None))(xs, extra)
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None))(xs, extra)
        return [*g1, *second, *func_grad, func_second, batched, per_sample]

    names = ["dx", "dextra", "d2x", "d2extra", "func dx", "func dextra", "func d2x", "vmap", "vmap(grad)"]
    for name, ours, want in zip(names, results(backend), results("reference")):
        torch.testing.assert_close(ours, want, **tol, msg=f"{op} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_then_restore_round_trip(backend):
    dev = device_of(backend)
    x = randn(2, 10, 3, device=dev, generator=gen(9))
    kept, mask, restore, _ = random_masking(x, 0.7, generator=torch.Generator(dev).manual_seed(1), backend=backend)
    token = torch.full((3,), -7.0, device=dev)
    full = restore_tokens(kept, token, restore, backend=backend)
    m = mask.bool()[..., None]
    assert torch.equal(torch.where(m, x, full), x)  # kept slots are back in place
    assert torch.equal(full[mask.bool()], token.expand(int(mask.sum()), 3))


# ---- modules ------------------------------------------------------------------------------------

def test_modules():
    torch.manual_seed(0)
    masking, restore = RandomMasking(0.75), RestoreTokens(6)
    x = torch.randn(2, 8, 6, requires_grad=True)
    kept, mask, ids_restore, ids_keep = masking(x)
    assert kept.shape == (2, 2, 6)
    out = restore(kept.to(torch.bfloat16), ids_restore)  # bf16 tokens and the fp32 token: fp32, as MAE's cat
    assert out.dtype == torch.float32 and out.shape == (2, 8, 6)
    token = restore.mask_token.detach()
    full = torch.cat([kept.detach().to(torch.bfloat16), token.expand(2, 6, 6)], 1)
    assert torch.equal(out.detach(), torch.gather(full, 1, ids_restore[..., None].expand(2, 8, 6)))
    out.float().sum().backward()
    assert restore.mask_token.grad is not None and x.grad is not None
    assert torch.allclose(restore.mask_token.grad, torch.full((1, 1, 6), 12.0))
    assert "mask_ratio=0.75" in repr(masking) and "dim=6" in repr(restore)


@pytest.mark.parametrize("ctor, exc, word", [
    (lambda: RandomMasking(1.0), ValueError, "mask_ratio"),
    (lambda: RandomMasking(-0.1), ValueError, "mask_ratio"),
    (lambda: RandomMasking("0.5"), TypeError, "mask_ratio"),
    (lambda: RestoreTokens(0), ValueError, "dim"),
    (lambda: RestoreTokens(2.5), TypeError, "dim"),
])
def test_module_arguments(ctor, exc, word):
    with pytest.raises(exc, match=word):
        ctor()


def test_random_masking_module_ratio_per_call():
    """MAE's forward_encoder(x, mask_ratio): the module takes a ratio per call by keyword, and a
    number in the noise slot (MAE's random_masking(x, mask_ratio) form) is named as such."""
    x, noise = torch.randn(2, 10, 3), torch.rand(2, 10)
    module = RandomMasking(0.75)
    kept, mask, restore, keep = module(x, noise, mask_ratio=0.3)
    want = random_masking(x, 0.3, noise=noise)
    assert kept.shape == (2, 7, 3) and all(torch.equal(a, b) for a, b in zip((kept, mask, restore, keep), want))
    assert module(x, noise)[0].shape == (2, 2, 3)  # the module's own ratio otherwise
    with pytest.raises(TypeError, match="second argument is noise.*RandomMasking\\(mask_ratio\\)"):
        module(x, 0.75)
    with pytest.raises(ValueError, match="mask_ratio"):
        module(x, mask_ratio=1.0)


# ---- bad input ----------------------------------------------------------------------------------

X = torch.randn(2, 5, 4)
IDS = torch.tensor([[0, 4], [1, 2]])
RESTORE = torch.argsort(torch.rand(2, 5), dim=1)


@pytest.mark.parametrize("call, exc, word", [
    (lambda: random_masking(X, 1.0), ValueError, "mask_ratio"),
    (lambda: random_masking(X, -0.25), ValueError, "mask_ratio"),
    (lambda: random_masking(X, float("nan")), ValueError, "mask_ratio"),
    (lambda: random_masking(X, True), TypeError, "mask_ratio"),
    (lambda: random_masking(X, None), TypeError, "mask_ratio"),
    (lambda: random_masking(X[0], 0.5), ValueError, "x"),
    (lambda: random_masking(X.long(), 0.5), TypeError, "x"),
    (lambda: random_masking([[1.0]], 0.5), TypeError, "x"),
    (lambda: random_masking(X, 0.5, noise=torch.rand(2, 4)), ValueError, "noise"),
    (lambda: random_masking(X, 0.5, noise=torch.ones(2, 5, dtype=torch.long)), TypeError, "noise"),
    (lambda: random_masking(X, 0.5, pos_embed=torch.randn(5, 3)), ValueError, "pos_embed"),
    (lambda: random_masking(X, 0.5, pos_embed=torch.randn(5, 4).long()), TypeError, "pos_embed"),
    (lambda: random_masking(X, 0.5, backend="gpu"), ValueError, "backend"),
    (lambda: gather_tokens(X, torch.tensor([[0, 5], [1, 2]])), ValueError, "ids_keep"),
    (lambda: gather_tokens(X, torch.tensor([[0, -1], [1, 2]])), ValueError, "ids_keep"),
    (lambda: gather_tokens(X, IDS.float()), TypeError, "ids_keep"),
    (lambda: gather_tokens(X, IDS[0]), ValueError, "ids_keep"),
    (lambda: gather_tokens(X, IDS[:1]), ValueError, "ids_keep"),
    (lambda: gather_tokens(X[0], IDS), ValueError, "x"),
    (lambda: restore_tokens(X[:, :2], torch.zeros(3), RESTORE), ValueError, "mask_token"),
    (lambda: restore_tokens(X[:, :2], torch.zeros(1, 4), RESTORE), ValueError, "mask_token"),
    (lambda: restore_tokens(X[:, :2], torch.zeros(4).int(), RESTORE), TypeError, "mask_token"),
    (lambda: restore_tokens(X[:, :2], torch.zeros(4), RESTORE + 1), ValueError, "ids_restore"),
    (lambda: restore_tokens(X[:, :2], torch.zeros(4), RESTORE[:, :1]), ValueError, "ids_restore"),
    (lambda: restore_tokens(X[:, :2], torch.zeros(4), RESTORE[0]), ValueError, "ids_restore"),
    (lambda: restore_tokens(X[0], torch.zeros(4), RESTORE), ValueError, "x_kept"),
    (lambda: RestoreTokens(3)(X[:, :2], RESTORE), ValueError, "dim"),
])
def test_bad_input(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ extension")
def test_extension_op_rejects_bad_index():
    # A direct call of the C++ op (bypassing Python validation) errors instead of reading wild memory.
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fastcl_C.masking_segment_gather(X, torch.tensor([[0], [0]]), torch.tensor([[3], [1]]),
                                                  torch.tensor([[0, 9], [1, 2]]), None, None, False)


# ---- GPU only: the vectorised CUDA path and its scalar fallback --------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D, offset", [(768, 0), (768, 1), (130, 0), (3, 0)])
def test_gpu_vector_and_fallback(backend, dtype, D, offset):
    if backend == "cuda" and not extension_has_cuda():
        pytest.skip("fastcl._C built without CUDA")
    g = gen(D + offset)
    base = randn(8, 49, D + offset, dtype=dtype, device="cuda", generator=g)
    x = base[..., offset:]   # offset 1 misaligns every row: the kernel must fall back to scalars
    noise = torch.rand(8, 49, generator=g).cuda()
    pos = randn(49, D, dtype=dtype, device="cuda", generator=g)
    x1, x2 = leaf(x), leaf(x)
    kept = random_masking(x1, 0.75, noise=noise, pos_embed=pos, backend=backend)[0]
    r_kept = oracle_masking(x2 + pos, 0.75, noise)[0]
    assert torch.equal(kept, r_kept)
    up = randn(*kept.shape, dtype=dtype, device="cuda", generator=g)
    kept.backward(up)
    r_kept.backward(up)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("L", [32, 33, 196, 1024])
@pytest.mark.parametrize("noise_dtype", [torch.float32, torch.bfloat16])
def test_gpu_index_kernel_equals_mae_with_ties(backend, L, noise_dtype):
    """On CUDA, MAE's own argsort of coarse noise (many ties): equal bit for bit, NaN and -0.0
    included (L = 32 is torch's unstable sort on both sides, 33 its merge sort, 196 and 1024 its
    radix sort)."""
    if backend == "cuda" and not extension_has_cuda():
        pytest.skip("fastcl._C built without CUDA")
    g = gen(L)
    noise = (torch.randint(0, 5, (64, L), generator=g) / 4).to("cuda", noise_dtype)
    noise[0, 1] = noise[0, 2] = float("nan")  # Python's NaN: positive, one payload
    noise[1, 0], noise[1, 3] = 0.0, -0.0  # equal keys to a sort
    x = randn(64, L, 8, device="cuda", generator=g)
    for a, b in zip(random_masking(x, 0.75, noise=noise, backend=backend), oracle_masking(x, 0.75, noise)):
        assert torch.equal(a, b)


def test_auto_asks_the_dispatch_table_by_tokens_and_d(monkeypatch):
    """The masking ops hand ``resolve_backend`` their problem (B * L tokens, D, dtype), so ``auto``
    on CUDA follows the measured table like the losses; float64 stays on the GPU kernels (they take
    it), unlike the losses'."""
    import fastcl.masking as masking
    from fastcl.ops import dispatch
    seen = []

    def record(backend, device, problem=None):
        seen.append(problem)
        return "reference"
    monkeypatch.setattr(masking, "resolve_backend", record)
    x = randn(3, 10, 5)
    random_masking(x, 0.5, backend="auto")
    gather_tokens(x, torch.tensor([[0, 1], [2, 2], [9, 0]]), backend="auto")
    restore_tokens(randn(3, 4, 5), randn(5), torch.stack([torch.randperm(10) for _ in range(3)]), backend="auto")
    assert seen == [("masking", 30, 30, 5, torch.float32)] * 3

    monkeypatch.setattr(dispatch, "extension_has_cuda", lambda: True)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch, "pick_gpu_backend", lambda *problem: "cuda" if problem[0] == "masking" else "triton")
    for dtype in (torch.bfloat16, torch.float64):
        assert dispatch.resolve_backend("auto", torch.device("cuda"), ("masking", 30, 30, 5, dtype)) == "cuda"
    assert dispatch.resolve_backend("auto", torch.device("cuda"), ("similarity_lse", 8, 8, 4, torch.float64)) == "reference"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
def test_restore_tokens_needs_as_many_slots_as_kept_tokens(backend):
    """ids_restore of L = 3 columns for K = 5 kept tokens: every index is in [0, L), so only the
    L >= K check names the problem (the gather would otherwise fail unnamed or drop tokens)."""
    g = torch.Generator().manual_seed(41)
    x_kept, token = randn(3, 5, 7, generator=g), randn(7, generator=g)
    ids = torch.argsort(torch.rand(3, 3, generator=g), dim=1)
    with pytest.raises(ValueError, match=r"ids_restore must have L >= K = 5 columns, got shape \(3, 3\)"):
        restore_tokens(x_kept, token, ids, backend=backend)


@pytest.mark.parametrize("shape", [(1, 1, 7), (7,)])
def test_random_masking_refuses_a_broadcasting_pos_embed(shape):
    """A pos_embed of one token, (1, 1, D) or (D,), would broadcast over the L tokens; MAE's is one
    row per token, so it is refused by name (the fused kernels read L rows of it)."""
    g = torch.Generator().manual_seed(42)
    x = randn(3, 5, 7, generator=g)
    with pytest.raises(ValueError, match=rf"pos_embed must have shape \(L, D\) or \(1, L, D\) = \(1, 5, 7\), "
                                         rf"got {re.escape(str(shape))}"):
        random_masking(x, 0.4, pos_embed=randn(*shape, generator=g))


# ---- mutation audit ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_ratio_zero_round_trip(backend):
    """mask_ratio = 0 keeps every token (K = L, which MAE allows): restore_tokens takes ids_restore
    of L = K columns (L >= K, not L > K) and gives x back, no slot taking the mask token."""
    dev = device_of(backend)
    x = randn(3, 7, 5, device=dev, generator=gen(55))
    kept, mask, restore, _ = random_masking(x, 0.0, generator=torch.Generator(dev).manual_seed(2), backend=backend)
    assert kept.shape == x.shape and not mask.any()
    assert torch.equal(restore_tokens(kept, torch.full((5,), -7.0, device=dev), restore, backend=backend), x)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
def test_noise_on_another_device_is_named(backend):
    """Noise on another device than x (meta stands in for a GPU here) is refused by name: on the
    reference backend it would otherwise give a CPU result from indices it never checked."""
    x = randn(2, 5, 3, generator=gen(56))
    with pytest.raises(ValueError, match=r"noise must be on x's device cpu, got meta"):
        random_masking(x, 0.4, noise=torch.rand(2, 5, device="meta"), backend=backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
def test_pos_embed_and_mask_token_on_another_device_are_named(backend):
    """A pos_embed or mask_token on another device (meta for a GPU) is refused by name, not left
    to torch's unnamed device error or the kernel's missing meta implementation."""
    g = gen(57)
    with pytest.raises(ValueError, match=r"pos_embed must be on x's device cpu, got meta"):
        random_masking(randn(2, 5, 3, generator=g), 0.4, pos_embed=torch.randn(5, 3, device="meta"), backend=backend)
    with pytest.raises(ValueError, match=r"mask_token must be on x_kept's device cpu, got meta"):
        restore_tokens(randn(2, 3, 3, generator=g), torch.randn(3, device="meta"),
                       torch.argsort(torch.rand(2, 5, generator=g), dim=1), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mask_token_gradient_keeps_samples_fp32_until_the_total(backend, dtype):
    """d mask_token sums every sample's removed slots; the per-sample partial sums stay fp32
    until the total.  Two samples whose upstream rows nearly cancel leave a small total that
    partial sums rounded to the half dtype (errors ~ their size * 2^-9) would swamp."""
    dev = device_of(backend)
    g = gen(58)
    L, D, keep = 15, 7, 4
    restore = torch.argsort(torch.argsort(torch.rand(1, L, generator=g), dim=1), dim=1).repeat(2, 1).to(dev)
    up0 = randn(L, D, generator=g)
    up = torch.stack([up0, -up0 + 0.01 * randn(L, D, generator=g)]).to(device=dev, dtype=dtype)
    token = randn(D, dtype=dtype, device=dev, generator=g).requires_grad_()
    kept = randn(2, keep, D, dtype=dtype, device=dev, generator=g)
    restore_tokens(kept, token, restore, backend=backend).backward(up)
    ref = (up.double() * (restore >= keep)[..., None]).sum((0, 1))
    assert_close(token.grad, ref, dtype, "d mask_token of nearly cancelling samples")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_follows_the_default_dtype(backend):
    """MAE builds its mask with torch.ones, in the default float dtype: float64 under
    torch.set_default_dtype(torch.float64) (the other tests leave the default at float32)."""
    dev = device_of(backend)
    x = randn(2, 40, 3, device=dev, generator=gen(59))
    noise = torch.rand(2, 40, generator=gen(60)).to(dev)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        mask = random_masking(x, 0.5, noise=noise, backend=backend)[1]
    finally:
        torch.set_default_dtype(old)
    assert mask.dtype == torch.float64
    assert torch.equal(mask, oracle_masking(x, 0.5, noise)[1].double())


def test_random_masking_module_default_ratio():
    """RandomMasking() keeps MAE's default mask ratio, 0.75 (test_modules passes it explicitly)."""
    masking = RandomMasking()
    assert masking.mask_ratio == 0.75
    assert masking(torch.randn(2, 8, 3))[0].shape == (2, 2, 3)


def test_restore_tokens_module_token_as_mae():
    """MAE's mask token: a (1, 1, dim) float32 parameter (its state_dict shape) drawn by
    torch.nn.init.normal_(std=.02), the same draw under the same seed."""
    torch.manual_seed(61)
    token = RestoreTokens(67).mask_token
    torch.manual_seed(61)
    ref = torch.nn.init.normal_(torch.zeros(1, 1, 67), std=0.02)
    assert token.shape == (1, 1, 67) and token.dtype == torch.float32
    assert torch.equal(token.detach(), ref)
