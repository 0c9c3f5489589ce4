"""Builds the C++ (CPU/OpenMP) extension ``fastcl._C``; CUDA sources join it only when
CUDA PyTorch and nvcc are present.  The package stays importable without the extension."""
import glob
import os
import platform
import shutil
import sys

import setuptools
from setuptools import find_packages, setup

# An editable install before setuptools 64 runs `setup.py develop`, which ignores package_dir:
# fastcl.kernels (the top-level kernels/ folder) would be missing, without an error.
if "develop" in sys.argv and int(setuptools.__version__.split(".")[0]) < 64:
    sys.exit(f"fastcl's editable install needs setuptools >= 64 (found {setuptools.__version__}): "
             "pip install --upgrade setuptools, then install again")


def _toolkit_home():
    """A CUDA toolkit folder (bin/nvcc and include/cuda_runtime_api.h), for CUDA_HOME when it is
    unset: torch would take the folder above ``which nvcc``, which is wrong for a wrapper script
    such as /usr/local/bin/nvcc."""
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + sorted(
        glob.glob("/usr/local/cuda*"))
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
                os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def _library_headers(cuda_home):
    """Header folders of NVIDIA's pip wheels (nvidia/cu13/include, ...) when the toolkit lacks the
    cuBLAS/cuSPARSE/cuSOLVER headers that ATen's CUDA headers include (a minimal toolkit beside a
    pip-installed CUDA PyTorch)."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    wanted = ("cusparse.h", "cublas_v2.h", "cusolverDn.h")
    dirs = [d for root in nvidia.__path__ for d in sorted(glob.glob(os.path.join(root, "*", "include")))]
    return [d for d in dirs if any(os.path.exists(os.path.join(d, h)) for h in wanted)]


ext_modules, cmdclass = [], {}
if os.environ.get("FASTCL_NO_EXT", "0") != "1":
    home = None if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") else _toolkit_home()
    if home:
        os.environ["CUDA_HOME"] = home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    # -g0 overrides Python's -g: debug info for ATen's templates takes minutes of a 2-core build
    # and makes a 27 MB library.  (The sources include ATen.h, not torch/extension.h, for the same reason.)
    cxx = ["-O3", "-g0", "-fopenmp", "-std=c++17"]
    # Built from source on the machine that runs it, so tune for that CPU unless asked not to.
    if os.environ.get("FASTCL_NATIVE", "1") == "1" and platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-march=native")
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                and os.environ.get("FASTCL_NO_CUDA", "0") != "1" and cuda_sources)
    if use_cuda:
        ext = CUDAExtension(
            "fastcl._C", sources + cuda_sources,
            # -idirafter: the toolkit's own headers win; only the ATen glue (.cpp) needs these.
            extra_compile_args={"cxx": cxx + ["-DFASTCL_WITH_CUDA"]
                                + [f for d in _library_headers(CUDA_HOME) for f in ("-idirafter", d)],
                                "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("fastcl._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    packages=find_packages(include=["fastcl", "fastcl.*"]) + ["fastcl.kernels"],
    package_dir={"fastcl.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
