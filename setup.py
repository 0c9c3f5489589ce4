"""Builds the C++ (CPU/OpenMP) extension ``fastcl._C``; CUDA sources join it only when
CUDA PyTorch and nvcc are present.  The package stays importable without the extension."""
import glob
import os
import platform

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTCL_NO_EXT", "0") != "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    cxx = ["-O3", "-fopenmp", "-std=c++17"]
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
            extra_compile_args={"cxx": cxx + ["-DFASTCL_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17"]},
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
