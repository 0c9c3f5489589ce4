"""Shared test set-up: the tolerance table, helpers, per-test seeds, and the GPU marker."""
import os
import random
import zlib

import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU.  It must be set
# before any @triton.jit function is created, hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The one tolerance table: bound on ||out - ref|| / ||ref|| against a float64 reference computed
# on the same (already rounded) inputs.  Half-precision rows cover the fused GPU paths that
# round the gradient tile to the input dtype before the tensor-core products.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}

# Element-wise bounds, for outputs compared one element at a time (the CUDA kernels' gradient
# tiles, tests/test_cuda_host.py): rounded to the dtype from fp32 here and from float64 in the
# reference, one bf16/fp16 ulp apart at most, with an absolute floor for fp32 exp of logits near
# 25 (argument error 25 * 2^-24 on terms up to about 1) where terms of opposite signs cancel.
ELEMENT_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}

# Elementwise fp32 math (the Triton kernels' softplus and sigmoid) against float64 where exp is
# exactly rounded (the interpreter): a few ulp.  On a GPU, ex2.approx of t * log2(e) alone is off
# by ~2.6e-6 near t = -87, so ELEMENT_TOL's fp32 rtol applies there.
MATH_RTOL_EXACT_EXP = 1e-6

# Logits in the thousands (scale 100 on unnormalised features) carry an absolute rounding error
# of |s| * eps in any fp32 computation, which moves the feature gradients (dq, dk) only: tests at
# such magnitudes widen their TOL by this factor (measured 0.53x TOL[float32] for similarity_lse,
# 1.1x for the CLIP loss of tests/test_clip_info_nce.py; the LSEs and 0-d gradients stay within TOL).
LARGE_LOGITS_FACTOR = 6.0
# The GPU tests at such logits keep the factor they passed with on the H100/H200 (hardware exp2
# and log2 there, not re-measured since the CPU factor went from 50 to 6).
GPU_LARGE_LOGITS_FACTOR = 50.0

# Losses that L2-normalise in the input dtype (NT-Xent, DCL, PML's SupCon) feed rounded unit rows
# to the op, so their fp32 value moves by more than fp32's TOL (measured: 1.4e-4 relative in bf16,
# 3.5e-5 in fp16, seeds of tests/test_losses_family.py); their values take TOL[float32] times this.
NORMALISED_VALUE_FACTOR = {torch.bfloat16: 25.0, torch.float16: 5.0}

# The temperature's gradient of those losses is a difference of such values, so the rounded unit
# rows move it more (measured: 1.3e-4 relative in bf16, tests/test_memory_bank.py; 2.0e-4 in fp16,
# NT-Xent in tests/test_losses_family.py); it takes TOL[float32] times this where fp32_output_tol
# gives float32's row.
NORMALISED_SCALAR_GRAD_FACTOR = {torch.bfloat16: 50.0, torch.float16: 50.0}

# Backends whose fused kernels multiply gradient tiles rounded to the input dtype (the GPU kernels,
# and the same kernels in the Triton interpreter or compiled for the CPU): the scale's gradient,
# which they sum from those tiles, carries the input dtype's rounding (measured for similarity_lse:
# up to 3.6e-3 relative in bf16 and 7.6e-4 in fp16; for sigmoid_pair 8.0e-3 and 2.0e-3, in the slow
# fuzz), against at most 4.2e-6 on the reference and cpu backends.
TILE_ROUNDING_BACKENDS = ("triton", "cuda")

# assert_close(..., elementwise=True): besides the norm-wise bound, every element within this
# times TOL[dtype] (times ``factor``) of the largest reference magnitude, so that one wrong element,
# which moves the norm-wise error by only about 1/sqrt(numel), is caught.  Measured largest element
# errors of dq and dk over max|ref|: 0.84x TOL[float32] in the unit tests (Triton column ranges),
# 1.4x in the slow fuzz (cuda); 0.42x TOL[bfloat16] and 0.22x TOL[float16] (TOL's half rows hold
# more margin than its fp32 row, hence smaller factors there).
ELEMENTWISE_FACTOR = {torch.float64: 4.0, torch.float32: 4.0, torch.bfloat16: 2.5, torch.float16: 2.5}

# Hypersphere loss of a nearly collapsed fp32 batch: its uniformity term is ~1e-4, so the value's
# absolute fp32 error counts relative to it (measured 1.7x TOL[float32]).
COLLAPSED_BATCH_FACTOR = 10.0

# Model gradients under bf16 autocast against fp32 ones (or against another bf16 run, chunked
# differently): the model's activations are rounded to bf16 at every layer and the contrastive
# loss's gradient cancels, so they move by a few times TOL[bfloat16] (measured 0.17x of this
# factor's bound on the CPU, tests/test_train.py).
AUTOCAST_BF16_FACTOR = 2.5

# Model gradients of two fp32 runs on a GPU that round differently (TF32 model matmuls per chunk):
# TOL[float32] times this.
TF32_FACTOR = 10.0

# Results that are exactly 0 analytically, computed in fp32 from O(1) terms that cancel (the loss
# of a one-class batch, a bias gradient under shift-invariant softmax, a distillation term of a
# student equal to its teacher): an absolute bound, as a relative one means nothing at 0.
ZERO_ATOL = {"value": 1e-6, "grad": 1e-4}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _comparable(out: torch.Tensor, ref: torch.Tensor):
    """``out`` and ``ref`` in float64 on the CPU, with infinities of the same sign in both set to 0."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    both_inf = torch.isinf(out) & torch.isinf(ref) & (torch.sign(out) == torch.sign(ref))
    return out.masked_fill(both_inf, 0.0), ref.masked_fill(both_inf, 0.0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in ``out`` gives inf (never passes)."""
    if torch.isnan(out.detach()).any():
        return float("inf")
    out, ref = _comparable(out, ref)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def fp32_output_tol(dtype: torch.dtype, backend=None, *, from_tiles: bool = False) -> torch.dtype:
    """The row of TOL for an fp32 output (a loss value, an LSE, the 0-d gradient of a scale,
    temperature or bias) computed from ``dtype`` inputs that the float64 reference gets rounded
    alike: float32's (float64's for float64 inputs), whatever ``dtype`` is.  Only an output summed
    from gradient tiles (``from_tiles``: the scale's or temperature's gradient) of a backend in
    TILE_ROUNDING_BACKENDS takes ``dtype``'s own row."""
    if dtype == torch.float64:
        return torch.float64
    if from_tiles and backend in TILE_ROUNDING_BACKENDS:
        return dtype
    return torch.float32


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "",
                 factor: float = 1.0, elementwise: bool = False) -> None:
    """Fail unless ``rel_err(out, ref) <= factor * TOL[dtype]``; with ``elementwise``, also unless
    every ``|out - ref| <= ELEMENTWISE_FACTOR[dtype] * factor * TOL[dtype] * max|ref|``."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    tol = factor * TOL[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"
    if elementwise and out.numel():
        o, r = _comparable(out, ref)
        scale = r.abs().max()
        worst = float((o - r).abs().max() / scale.clamp_min(1e-30))
        bound = ELEMENTWISE_FACTOR[dtype] * tol
        assert worst <= bound, (f"{what}: largest element error {worst:.3e} of max|ref| > {bound:.1e} ({dtype}), "
                                f"at {tuple(int(i) for i in torch.unravel_index((o - r).abs().argmax(), o.shape))}")


def load_module(name: str, path):
    """The Python file at ``path`` imported as a module named ``name`` (benchmark scripts, peer
    sources, generated files: none of them is on the import path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pml_losses():
    """pytorch-metric-learning's ``losses`` module (the reference of the PML drop-ins), or a skip."""
    return pytest.importorskip("pytorch_metric_learning.losses")


def leaves(*tensors):
    """Fresh leaf copies of ``tensors`` that require grad (one per call site under comparison)."""
    return [t.detach().clone().requires_grad_() for t in tensors]


def check_loss_and_grads(ours, ref, wrt_ours, wrt_ref, dtype, what, value_factor=1.0):
    """A loss against its reference: the value at fp32's tolerance (fp64's for float64 inputs,
    times ``value_factor``), then each gradient of ``wrt_ours`` against ``wrt_ref``'s at
    ``dtype``'s."""
    assert_close(ours, ref, fp32_output_tol(dtype), f"{what} value", value_factor)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(ours, wrt_ours), torch.autograd.grad(ref, wrt_ref))):
        assert_close(a, b, dtype, f"{what} grad {i}")


def randn(*shape, dtype=torch.float32, device="cpu", generator=None, requires_grad=False):
    """Fresh random tensor in ``dtype`` (drawn in fp32, then rounded)."""
    x = torch.randn(*shape, generator=generator, device="cpu").to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


class LiveBytes:
    """Peak bytes of tensor storages created while active and alive at the same time (CPU or GPU),
    read through a dispatch mode: ``with LiveBytes() as mem: ...; mem.peak``.  A storage counts
    until the last tensor viewing it dies."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                # views and in-place results share an input's storage: not new memory
                given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_flatten((args, kwargs))[0]
                         if isinstance(t, torch.Tensor)}
                for t in torch.utils._pytree.tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                        tracker._add(t)
                return out

        self._mode, self.current, self.peak, self._seen = _Mode(), 0, 0, set()

    def _add(self, t):
        import weakref
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self._seen or size == 0:
            return
        self._seen.add(key)
        self.current += size
        self.peak = max(self.peak, self.current)

        def release(key=key, size=size):
            self.current -= size
            self._seen.discard(key)
        weakref.finalize(t if t._base is None else t._base, release)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


# Draws are fresh in every run and reproducible from the run's seed: each test seeds torch's and
# Python's generators from (this base, its id), and a failure prints FASTCL_TEST_SEED=<base>, which
# reruns the same draws.
def seed_base(text) -> int:
    """FASTCL_TEST_SEED's value (a non-negative int; unset or empty: a fresh one)."""
    if not text:
        return random.SystemRandom().randrange(1, 2**31)
    if not text.strip().isdigit():
        raise ValueError(f"FASTCL_TEST_SEED must be a non-negative integer, got {text!r}")
    return int(text)


TEST_SEED = seed_base(os.environ.get("FASTCL_TEST_SEED"))


@pytest.fixture(autouse=True)
def _seeded_draws(request):
    seed = (TEST_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        report.sections.append(("fastcl test seed", f"FASTCL_TEST_SEED={TEST_SEED} reruns these draws"))
    return report


def pytest_collection_modifyitems(config, items):
    # FASTCL_TESTS_LAST: comma-separated test file names run after all others, in that order (the
    # GPU suite puts test_gpu.py's hundreds of tests last, so a time cap cuts those, not the small
    # files).
    last = [f for f in os.environ.get("FASTCL_TESTS_LAST", "").split(",") if f]
    if last:
        items.sort(key=lambda item: last.index(item.path.name) + 1 if item.path.name in last else 0)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    # Start the background checks (tests/_background.py) that the selected, runnable tests read.
    import _background
    names = []
    for item in session.items:
        if item.get_closest_marker("skip") or any(m.args and m.args[0] is True for m in item.iter_markers("skipif")):
            continue
        names += [m.args[0] for m in item.iter_markers("background")]
    _background.start(names)


def pytest_sessionfinish(session, exitstatus):
    import _background
    _background.stop()


@pytest.fixture
def cuda_ext():
    """The CUDA kernels must be built on a CUDA machine, unless the build was told to skip them."""
    from fastcl._ext import extension_has_cuda
    if not extension_has_cuda():
        if os.environ.get("FASTCL_NO_EXT") == "1" or os.environ.get("FASTCL_NO_CUDA") == "1":
            pytest.skip("built without the CUDA kernels on purpose")
        pytest.fail("fastcl._C has no CUDA kernels on a CUDA machine: the CUDA build failed (see build.log)")
