"""The CUDA sources, checked without a GPU.

* Every ``csrc/**/*.cu`` compiles with the machine's nvcc for sm_80 (A100) and sm_90 (H100), and
  ptxas reports no register spills or stack frame in any kernel.
* The 16-byte paths are 128-bit loads and stores in the sm_90 machine code (read with the
  cuobjdump that Triton ships).
* Every ATen glue file ``csrc/cuda/*.cpp`` compiles against this torch's headers, loads, and
  registers its CUDA kernels with signatures that match their schemas (torch checks that at
  registration).  A CPU torch ships the ATen/c10 CUDA headers but not the CUDA libraries' ones,
  so the handful of cuBLAS/cuSPARSE/cuSOLVER typedefs those headers name are stubbed here; the
  library is loaded with lazy binding and none of its CUDA code runs."""
import functools
import os
import pathlib
import re
import shutil
import sys
import sysconfig

import pytest
import torch

import _background

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILES = sorted(ROOT.glob("csrc/**/*.cu"))
GLUE_FILES = sorted(ROOT.glob("csrc/cuda/*.cpp"))
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++")


def _cuobjdump():
    """The cuobjdump that Triton's NVIDIA backend ships, or None."""
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return None
    path = pathlib.Path(nv.__file__).parent / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def _compile(source: pathlib.Path, arch: str) -> dict:
    """nvcc's report (stdout + stderr), return code, command and, for sm_90, the SASS of ``source``
    compiled as setup.py's build does; one compile per file and arch serves every test here."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what setup.py's build adds (no half operators)
    obj = pathlib.Path(_background.workdir()) / f"{source.stem}_{arch}.o"
    cmd = [NVCC, "-c", f"-arch={arch}", "-std=c++17", "-O3", *COMMON_NVCC_FLAGS, "--resource-usage", str(source),
           "-o", str(obj)]
    proc = _background.run(cmd, timeout=600)
    out = dict(cmd=" ".join(cmd), returncode=proc.returncode, report=proc.stdout + proc.stderr,
               size=obj.stat().st_size if obj.exists() else 0, sass=None)
    if proc.returncode == 0 and arch == "sm_90" and _cuobjdump() is not None:
        out["sass"] = _background.run([_cuobjdump(), "-sass", str(obj)], timeout=300).stdout
    return out


ARCHS = ["sm_90", "sm_80"]
if NVCC is not None:
    for _src in CU_FILES:
        for _arch in ARCHS:
            _background.job(f"nvcc:{_src.name}:{_arch}", functools.partial(_compile, _src, _arch))


def _compiled(source: pathlib.Path, arch: str) -> dict:
    return _background.result(f"nvcc:{source.name}:{arch}")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(not CU_FILES, reason="no .cu sources yet")
@pytest.mark.parametrize("source,arch", [
    pytest.param(s, a, marks=pytest.mark.background(f"nvcc:{s.name}:{a}"), id=f"{s.relative_to(ROOT)}-{a}")
    for s in CU_FILES for a in ARCHS])
def test_nvcc_compiles(source, arch):
    out = _compiled(source, arch)
    assert out["returncode"] == 0, f"{out['cmd']} failed:\n{out['report']}"
    assert out["size"] > 0
    # ptxas reports each kernel: no register spills, no stack frame (local memory).
    report = out["report"]
    usage = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(usage) >= 4, report[-2000:]
    assert all(u == ("0", "0", "0") for u in usage), f"local memory or spills:\n{report[-4000:]}"


def _cuda_include():
    """The CUDA toolkit's include directory (cuda_runtime_api.h), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC:
        candidates.append(str(pathlib.Path(NVCC).resolve().parents[1]))
    for c in filter(None, candidates):
        inc = pathlib.Path(c) / "include"
        if (inc / "cuda_runtime_api.h").exists():
            return inc
    return None


_STUB_HEADERS = {
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
    "c10/cuda/impl/cuda_cmake_macros.h": "#pragma once\n",
}
# The one data symbol of libc10_cuda that inline header code names (lazy binding covers functions).
_DATA_STUB = ("#include <c10/cuda/CUDACachingAllocator.h>\n"
              "namespace c10::cuda::CUDACachingAllocator { std::atomic<CUDAAllocator*> allocator; }\n")

_LOAD_AND_LIST = """
import ctypes, json, os, sys, torch
ctypes.CDLL(sys.argv[1], mode=os.RTLD_LAZY | os.RTLD_GLOBAL)
ops = {}
for name in torch._C._dispatch_get_all_op_names():
    if name.startswith("fastcl_C::"):
        ops[name] = torch._C._dispatch_dump(name)
print(json.dumps(ops))
"""


def _build_glue() -> dict:
    """Compiles every ATen glue file (one g++ at a time: this runs beside the tests), links them
    with lazy binding, loads the library in a fresh interpreter and lists the ``fastcl_C`` ops it
    registers with their dispatch tables (``torch._C._dispatch_dump``)."""
    import json

    from torch.utils.cpp_extension import include_paths, library_paths
    tmp = pathlib.Path(_background.workdir()) / "glue"
    stubs = tmp / "stubs"
    for rel, text in _STUB_HEADERS.items():
        (stubs / rel).parent.mkdir(parents=True, exist_ok=True)
        (stubs / rel).write_text(text)
    data_stub = tmp / "data_stub.cpp"
    data_stub.write_text(_DATA_STUB)
    flags = ["-std=c++17", "-O0", "-fPIC", "-w", "-DFASTCL_WITH_CUDA", "-DTORCH_EXTENSION_NAME=glue_check",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *[f"-I{p}" for p in include_paths()], f"-I{_cuda_include()}", f"-I{stubs}",
             f"-I{sysconfig.get_paths()['include']}"]
    objs = []
    for src in GLUE_FILES + [data_stub]:  # each pulls in ATen: ~10 s of g++
        obj = tmp / (src.stem + ".o")
        objs.append(obj)
        proc = _background.run([CXX, *flags, "-c", str(src), "-o", str(obj)], timeout=600)
        assert proc.returncode == 0, f"g++ failed on {src}:\n{proc.stderr[-4000:]}"
    lib = tmp / "glue_check.so"
    libs = [f"-L{p}" for p in library_paths()] + ["-ltorch", "-ltorch_cpu", "-lc10"]
    link = _background.run([CXX, "-shared", *map(str, objs), "-o", str(lib), *libs,
                            "-Wl,--unresolved-symbols=ignore-all"], timeout=300)
    assert link.returncode == 0, link.stderr[-4000:]
    run = _background.run([sys.executable, "-c", _LOAD_AND_LIST, str(lib)], timeout=300)
    assert run.returncode == 0, f"loading the glue failed (schema/signature mismatch?):\n{run.stderr[-4000:]}"
    return json.loads(run.stdout)


_background.job("g++:aten-glue", _build_glue)


@pytest.mark.skipif(CXX is None or _cuda_include() is None, reason="needs g++ and the CUDA toolkit headers")
@pytest.mark.skipif(not GLUE_FILES, reason="no ATen glue sources")
@pytest.mark.background("g++:aten-glue")  # about a minute of g++, beside the other tests
def test_glue_compiles_and_registers_its_cuda_kernels():
    ops = _background.result("g++:aten-glue")
    # Every op the glue registers has a CUDA kernel; the strip ops are among them.
    for name in ("cuda_strip_lse_fwd", "cuda_strip_lse_bwd", "cuda_strip_sigmoid_fwd", "cuda_strip_sigmoid_bwd",
                 "masking_segment_gather", "masking_indices"):
        assert f"fastcl_C::{name}" in ops, sorted(ops)
        assert "\nCUDA: registered at" in ops[f"fastcl_C::{name}"], ops[f"fastcl_C::{name}"]
    assert "Tensor(a!) scores" in ops["fastcl_C::cuda_strip_lse_bwd"]


def _sass(source: pathlib.Path) -> str:
    """The sm_90 SASS of ``source`` (cuobjdump of the object test_nvcc_compiles checks)."""
    out = _compiled(source, "sm_90")
    assert out["returncode"] == 0, f"{out['cmd']} failed:\n{out['report'][-4000:]}"
    return out["sass"]


def _vector_case(source, kernel, ops):
    return pytest.param(source, kernel, ops, marks=pytest.mark.background(f"nvcc:{pathlib.Path(source).name}:sm_90"))


@pytest.mark.skipif(NVCC is None or _cuobjdump() is None, reason="needs nvcc and Triton's cuobjdump")
@pytest.mark.parametrize("source,kernel,ops", [
    _vector_case("csrc/cuda/similarity_strips.cu", r"lse_fwd_kernelILi4E", ["LDG.E.128"]),
    _vector_case("csrc/cuda/similarity_strips.cu", r"rowwise_kernel.*Li4E", ["LDG.E.128"]),
    _vector_case("csrc/cuda/masking.cu", r"row_copy_kernel.*Li(8|4|2)E", ["LDG.E.128", "STG.E.128"]),
    _vector_case("csrc/cuda/masking.cu", r"segment_gather_kernel.*Li(8|4|2)E", ["LDG.E.128", "STG.E.128"]),
])
def test_vector_kernels_move_16_byte_words(source, kernel, ops):
    """The 16-byte paths compile to 128-bit loads (and stores, for masking) on sm_90, read from
    the machine code: every instantiation whose name matches ``kernel`` has each of ``ops``."""
    sass = _sass(ROOT / source)
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    matched = [f for f in functions if re.search(kernel, f.split("\n", 1)[0])]
    assert matched, f"no instantiation matches {kernel}"
    for body in matched:
        name = body.split("\n", 1)[0].strip()
        for op in ops:
            assert re.search(rf"\b{re.escape(op)}\b", body), f"{name}: no {op}"


@pytest.mark.skipif(NVCC is None or _cuobjdump() is None, reason="needs nvcc and Triton's cuobjdump")
@pytest.mark.background("nvcc:similarity_strips.cu:sm_90")
def test_epilogues_stay_cheap():
    """The epilogues read a 4-byte score each, so their arithmetic must stay small enough to keep
    them bandwidth-bound.  SASS instructions of the 16-byte kernels (nvcc 13.0, sm_90), before and
    after: the LSE forward (rows and columns) 8240 -> 3048 once its online updates went
    branch-free on the SFU's exp2/log2; the LSE gradient 1504 -> 1088 (SFU exp2); softplus
    1528 -> 1040 and the sigmoid gradient 1256 -> 840 (log1p by a series, a fast reciprocal).
    The ceilings sit between, so any of those coming back fails them."""
    sass = _sass(ROOT / "csrc/cuda/similarity_strips.cu")
    ceilings = {r"lse_fwd_kernelILi4ELb1ELb1E": 4500, r"rowwise_kernel.*LseGradOp.*Li4E": 1300,
                r"rowwise_kernel.*SoftplusOp.*Li4E": 1300, r"rowwise_kernel.*SigmoidGradOp.*Li4E": 1050}
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    for pattern, top in ceilings.items():
        matched = [f for f in functions if re.search(pattern, f.split("\n", 1)[0])]
        assert matched, f"no instantiation matches {pattern}"
        for body in matched:
            count = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+\S", body))
            assert count <= top, f"{body.split(chr(10), 1)[0].strip()}: {count} instructions > {top}"
