// Python module entry point for fastcl._C.  Ops register themselves with TORCH_LIBRARY_FRAGMENT
// in their own files (namespace fastcl_C); this file only makes the shared library importable.
#include <pybind11/pybind11.h>

#include <string>

#include "tile_gemm.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

static bool has_cuda() {
#ifdef FASTCL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

static std::string cpu_gemm() { return fastcl::tile_gemm_name(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_openmp", &has_openmp, "True when the extension was built with OpenMP");
  m.def("has_cuda", &has_cuda, "True when the extension was built with its CUDA kernels");
  m.def("cpu_gemm", &cpu_gemm, "GEMM behind the fp32 CPU tiles: 'onednn' or 'aten' (FASTCL_CPU_GEMM=aten forces it)");
}
