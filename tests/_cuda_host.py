"""The CUDA kernels of csrc/cuda, compiled for the CPU and called through ctypes.

``build()`` rewrites the launches of each .cu file for tests/cuda_host/cuda_host.h (GPU threads
as fibers, barriers and shuffles emulated) and compiles it, with the C entry points of
tests/cuda_host/kernels_capi.cpp, into a shared library with g++ (cached by content hash).
``HostEpilogues``, ``host_segment_gather`` and ``host_mask_indices`` then do what the ATen glue
of csrc/cuda/*_ops.cpp does around each launch, on CPU tensors: the real kernel code runs, so the tests check its
indexing, vector paths, partial merges and in-place writes without a GPU.
"""
import contextlib
import ctypes
import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOST_DIR = ROOT / "tests" / "cuda_host"
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = ("similarity_strips.cu", "masking.cu")
# kernel<T, ...><<<grid, block, shmem, stream>>>(args);
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.*?)>>>\(([^;]*)\);", re.S)
# __launch_bounds__(max threads) kernel_name(
BOUNDS = re.compile(r"__launch_bounds__\(([^)]*)\)\s+(\w+)\s*\(")
# -fsanitize=alignment checks every vector access; the handler in kernels_capi.cpp turns a
# misaligned one (a GPU would fault) into a launch failure.  -fno-gnu-unique keeps the emulator's
# state per library, so a test's mutant library does not share it with the main one.
CXXFLAGS = ["-std=c++17", "-O1", "-g", "-fPIC", "-fno-strict-aliasing", "-fno-gnu-unique", "-fsanitize=alignment",
            "-Wno-unknown-pragmas"]

OUT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MASKING_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@functools.lru_cache(maxsize=None)
def compiler():
    """The C++ compiler, or None when there is none or it lacks what the shims need (_Float16)."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        return None
    probe = subprocess.run([cxx, "-x", "c++", "-fsyntax-only", "-"], input="_Float16 h = 1.0f;\n",
                           capture_output=True, text=True)
    return cxx if probe.returncode == 0 else None


def host_source(text: str) -> str:
    """CUDA source with every ``kernel<<<cfg>>>(args);`` rewritten as a host launch, which also
    checks the block size against the kernel's ``__launch_bounds__``."""
    bounds = {name: expr for expr, name in BOUNDS.findall(text)}

    def launch(m):
        bound = bounds.get(m[1].split("<")[0], "1024")
        return f"::cuda_host::launch({m[2]}, [&] {{ {m[1]}({m[3]}); }}, {bound});"

    out, n = LAUNCH.subn(launch, text)
    if n != text.count("<<<"):
        raise RuntimeError(f"rewrote {n} of {text.count('<<<')} kernel launches")
    return out


def build(overrides=None) -> pathlib.Path:
    """Path of the compiled library (built on first use, keyed by the sources' content);
    ``overrides`` maps a name of SOURCES to replacement text (the tests' mutants)."""
    texts = {s: (overrides or {}).get(s) or (CUDA_DIR / s).read_text() for s in SOURCES}
    others = sorted(CUDA_DIR.glob("*.cuh")) + sorted(HOST_DIR.rglob("*.[ch]*"))
    key = "".join(texts.values()) + " ".join([compiler() or ""] + CXXFLAGS)
    digest = hashlib.sha256(key.encode() + b"".join(p.name.encode() + p.read_bytes() for p in others)).hexdigest()[:16]
    out_dir = pathlib.Path(tempfile.gettempdir()) / f"fastcl_cuda_host_{digest}"
    lib = out_dir / "libcuda_host.so"
    if lib.exists():
        return lib
    work = pathlib.Path(tempfile.mkdtemp(prefix="fastcl_cuda_host_build_"))
    cpp = []
    for name, text in texts.items():
        dst = work / (pathlib.Path(name).stem + ".cpp")
        dst.write_text(f'#line 1 "{CUDA_DIR / name}"\n' + host_source(text))
        cpp.append(str(dst))
    # One process per file, in parallel; the link adds no sanitizer runtime (the handler is ours).
    flags = [*CXXFLAGS, f"-I{HOST_DIR / 'include'}", f"-I{CUDA_DIR}", "-include", str(HOST_DIR / "cuda_host.h")]
    units = [(src, str(work / (pathlib.Path(src).stem + ".o"))) for src in cpp + [str(HOST_DIR / "kernels_capi.cpp")]]
    procs = [(src, subprocess.Popen([compiler(), *flags, "-c", src, "-o", obj], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)) for src, obj in units]
    for src, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {src} for the CPU failed:\n{err[-4000:]}")
    done = subprocess.run([compiler(), "-shared", *[obj for _, obj in units], "-o", str(work / lib.name)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"linking the CPU build of csrc/cuda failed:\n{done.stderr[-4000:]}")
    out_dir.mkdir(exist_ok=True)
    os.replace(work / lib.name, lib)  # atomic: a concurrent build just replaces it
    shutil.rmtree(work, ignore_errors=True)
    return lib


def load(path) -> ctypes.CDLL:
    """The library at ``path`` with its C signatures declared."""
    lib = ctypes.CDLL(str(path))
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    strip = [P, I64, I64, I64, P, P]
    lib.host_set_reverse.argtypes = [I]
    lib.host_error_string.argtypes, lib.host_error_string.restype = [I], ctypes.c_char_p
    lib.host_launches.restype = I64
    lib.host_lse_fwd_plan.argtypes = [I64, I64, I, P]
    lib.host_lse_fwd.argtypes = strip + [I, I64, I, I, P, P, P, P, P]
    lib.host_lse_bwd.argtypes = strip + [I, I64, P, P, P, P, I]
    lib.host_sigmoid_fwd.argtypes = strip + [I64, P]
    lib.host_sigmoid_bwd.argtypes = strip + [I64, I, P]
    lib.host_segment_gather.argtypes = [ctypes.POINTER(SegmentGatherArgs)]
    lib.host_mask_indices.argtypes = [ctypes.POINTER(MaskIndicesArgs)]
    return lib


_LIB = None


def library() -> ctypes.CDLL:
    """The library built from the sources as they are (the one the wrappers below call)."""
    global _LIB
    if _LIB is None:
        _LIB = load(build())
    return _LIB


@contextlib.contextmanager
def using(lib: ctypes.CDLL):
    """Make the wrappers below call ``lib`` (a mutant) inside the block."""
    global _LIB
    saved = library()
    _LIB = lib
    try:
        yield lib
    finally:
        _LIB = saved


def set_reverse(reverse: bool) -> None:
    """Run each block's threads in descending order (the other interleaving)."""
    library().host_set_reverse(int(reverse))


def launches() -> int:
    """Kernel launches so far."""
    return library().host_launches()


def _ptr(t):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _check(err: int, op: str) -> None:
    if err != 0:
        raise RuntimeError(f"{op} launch failed: {library().host_error_string(err).decode()}")


class HostEpilogues:
    """Same signatures as ``fastcl.ops.strips.CudaEpilogues``, on CPU tensors.

    ``sm_count`` feeds ``lse_fwd_plan``; a small one at small sizes gives several column splits
    and row groups, so the partial buffers and the merge kernel run too."""

    sm_count = 2

    @staticmethod
    def _args(scores, scale, bias):
        assert scores.dtype == torch.float32 and scores.dim() == 2 and scores.stride(1) == 1
        assert scores.stride(0) >= scores.shape[1] and scale.numel() == 1 and bias.numel() == 1
        assert scale.dtype == torch.float32 and bias.dtype == torch.float32
        r, m = scores.shape
        return [scores.data_ptr(), r, m, scores.stride(0), scale.data_ptr(), bias.data_ptr()]

    @classmethod
    def lse_fwd(cls, scores, scale, bias, diag, rows, cols):
        args = cls._args(scores, scale, bias)
        r, m = scores.shape
        # NaN-poisoned, where the glue has at::empty: an element the kernels skip shows.
        row = scores.new_full((r if rows else 0,), float("nan"))
        col = scores.new_full((m if cols else 0,), float("nan"))
        if r == 0 or m == 0:
            return row.fill_(float("-inf")), col.fill_(float("-inf"))
        plan = torch.zeros(3, dtype=torch.int64)
        library().host_lse_fwd_plan(r, m, cls.sm_count, plan.data_ptr())
        groups, splits, _ = plan.tolist()
        row_part = scores.new_full((splits, r), float("nan")) if rows and splits > 1 else None
        col_part = scores.new_full((groups, m), float("nan")) if cols and groups > 1 else None
        _check(library().host_lse_fwd(*args, diag is not None, diag or 0, rows, cols, plan.data_ptr(),
                                      _ptr(row_part), _ptr(col_part), _ptr(row), _ptr(col)), "lse_fwd")
        return row, col

    @classmethod
    def lse_bwd(cls, scores, scale, bias, diag, row_lse, g_row, col_lse, g_col, out_dtype):
        r, m = scores.shape
        for t, n in ((row_lse, r), (g_row, r), (col_lse, m), (g_col, m)):  # the glue's check_vector
            assert t is None or (t.dtype == torch.float32 and t.shape == (n,) and t.is_contiguous()), (t, n)
        stats = [None if t is None else t.contiguous() for t in (row_lse, g_row, col_lse, g_col)]
        _check(library().host_lse_bwd(*cls._args(scores, scale, bias), diag is not None, diag or 0,
                                      *[_ptr(t) for t in stats], OUT_TYPES[out_dtype]), "lse_bwd")

    @classmethod
    def sigmoid_fwd(cls, scores, scale, bias, diag):
        row_sum = scores.new_full((scores.shape[0],), float("nan"))
        _check(library().host_sigmoid_fwd(*cls._args(scores, scale, bias), diag, _ptr(row_sum)), "sigmoid_fwd")
        return row_sum.zero_() if scores.shape[1] == 0 else row_sum

    @classmethod
    def sigmoid_bwd(cls, scores, scale, bias, diag, out_dtype):
        row_sum = scores.new_full((scores.shape[0],), float("nan"))
        _check(library().host_sigmoid_bwd(*cls._args(scores, scale, bias), diag, OUT_TYPES[out_dtype],
                                          _ptr(row_sum)), "sigmoid_bwd")
        return row_sum.zero_() if scores.shape[1] == 0 else row_sum


class SegmentGatherArgs(ctypes.Structure):
    """csrc/cuda/masking.cuh's SegmentGatherArgs."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("src", "start", "count", "order", "fill", "pos", "out")]
                + [(n, ctypes.c_int64) for n in ("B", "S", "R", "D", "J", "src_sb", "src_ss", "start_sb", "start_sr",
                                                 "count_sb", "count_sr", "order_sb", "order_sj", "pos_ss")]
                + [("dtype", ctypes.c_int), ("out_fp32", ctypes.c_bool)])


def host_segment_gather(src, start, count, order, fill, pos, out_fp32):
    """``fastcl_C::masking_segment_gather`` on CPU tensors through the CUDA kernel (the steps of
    csrc/cuda/masking_ops.cpp; the arguments are assumed checked)."""
    assert all(t is None or t.dtype == torch.int64 for t in (start, count, order))  # as check_args demands
    src = src if src.stride(2) == 1 else src.contiguous()
    fill = None if fill is None else fill.contiguous().view(-1)
    pos = pos if pos is None or pos.stride(1) == 1 else pos.contiguous()
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32
    b, s, d = src.shape
    out = torch.full((b, start.shape[1], d), float("nan"), dtype=acc if out_fp32 else src.dtype)  # poisoned
    if out.numel() == 0:
        return out
    a = SegmentGatherArgs(
        src=src.data_ptr(), start=start.data_ptr(), count=_ptr(count), order=_ptr(order), fill=_ptr(fill),
        pos=_ptr(pos), out=out.data_ptr(), B=b, S=s, R=start.shape[1], D=d,
        J=order.shape[1] if order is not None else s, src_sb=src.stride(0), src_ss=src.stride(1),
        start_sb=start.stride(0), start_sr=start.stride(1),
        count_sb=count.stride(0) if count is not None else 0, count_sr=count.stride(1) if count is not None else 0,
        order_sb=order.stride(0) if order is not None else 0, order_sj=order.stride(1) if order is not None else 0,
        pos_ss=pos.stride(0) if pos is not None else 0, dtype=MASKING_DTYPES[src.dtype], out_fp32=out_fp32)
    _check(library().host_segment_gather(ctypes.byref(a)), "segment_gather")
    return out


class MaskIndicesArgs(ctypes.Structure):
    """csrc/cuda/masking.cuh's MaskIndicesArgs."""
    _fields_ = ([(n, ctypes.c_void_p) for n in ("noise", "ids_restore", "ids_keep", "mask")]
                + [(n, ctypes.c_int64) for n in ("B", "L", "K", "noise_sb", "noise_sl")]
                + [("dtype", ctypes.c_int), ("mask_f64", ctypes.c_bool)])


def host_mask_indices(noise, keep, mask_dtype):
    """``fastcl_C::masking_indices`` on a CPU tensor through the CUDA kernel (the steps of
    csrc/cuda/masking_ops.cpp); outputs are poisoned first, so an element left unwritten shows."""
    b, length = noise.shape
    ids_restore = torch.full((b, length), -7, dtype=torch.int64)
    ids_keep = torch.full((b, keep), -7, dtype=torch.int64)
    mask = torch.full((b, length), float("nan"), dtype=mask_dtype)
    if b * length == 0:
        return ids_restore, ids_keep, mask
    a = MaskIndicesArgs(noise=noise.data_ptr(), ids_restore=ids_restore.data_ptr(), ids_keep=_ptr(ids_keep),
                        mask=mask.data_ptr(), B=b, L=length, K=keep, noise_sb=noise.stride(0),
                        noise_sl=noise.stride(1), dtype=MASKING_DTYPES[noise.dtype],
                        mask_f64=mask_dtype == torch.float64)
    _check(library().host_mask_indices(ctypes.byref(a)), "mask_indices")
    return ids_restore, ids_keep, mask


def route_to_host(monkeypatch) -> None:
    """Make ``backend="cuda"`` on CPU tensors run these kernels: the strip epilogues of the
    similarity ops and the segment gather of masking (everything else is the library's code)."""
    import fastcl.ops.masking
    from _strip_emulation import CUDA_OP_MODULES, route_cuda_backend
    route_cuda_backend(monkeypatch, HostEpilogues, CUDA_OP_MODULES + ("fastcl.masking",))
    gather = fastcl.ops.masking._segment_gather

    def host_or_library(src, start, count, order, fill, pos, out_fp32, backend):
        if backend != "cuda":
            return gather(src, start, count, order, fill, pos, out_fp32, backend)
        return host_segment_gather(src, start, count, order, fill, pos, out_fp32)

    monkeypatch.setattr(fastcl.ops.masking, "_segment_gather", host_or_library)
    indices = fastcl.ops.masking._mask_indices

    def host_or_library_indices(noise, keep, mask_dtype, backend):
        if backend != "cuda":
            return indices(noise, keep, mask_dtype, backend)
        return host_mask_indices(noise, keep, mask_dtype)

    monkeypatch.setattr(fastcl.ops.masking, "_mask_indices", host_or_library_indices)

