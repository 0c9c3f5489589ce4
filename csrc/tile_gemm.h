// out = beta * out + alpha * a @ b for the CPU tile kernels, through the fastest fp32 GEMM at
// hand.  On this project's CPU, oneDNN's fp32 matmul (IEEE fp32 arithmetic) makes the CLIP
// benchmark 2.87 s instead of 3.31 s with the BLAS behind at::addmm (benchmarks/README.md), so
// fp32 tiles go through ATen's exported oneDNN entry point when the running libtorch has it.
// The header that declares it is not installed, so it is looked up at run time: a libtorch
// without it, fp64, or FASTCL_CPU_GEMM=aten falls back to at::addmm_out ("onednn" or unset:
// oneDNN when present).  Some builds refuse that entry point on CPUs without AVX-512 or
// AVX-NE-CONVERT (torch 2.13 on an AVX2-only EPYC: "mkldnn_matmul bf16 path needs ...", for fp32
// too); it checks before touching `out`, so the first refusal switches to addmm for good.
#pragma once

#include <ATen/ATen.h>

#include <dlfcn.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace fastcl {

using OnednnMatmul = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float, float);

inline OnednnMatmul find_onednn_matmul() {
  const char* choice = std::getenv("FASTCL_CPU_GEMM");
  const bool valid = choice == nullptr || choice[0] == '\0' || std::strcmp(choice, "onednn") == 0 ||
                     std::strcmp(choice, "aten") == 0;
  TORCH_CHECK(valid, "FASTCL_CPU_GEMM must be unset, 'onednn' or 'aten', got '", choice ? choice : "", "'");
  if (choice != nullptr && std::strcmp(choice, "aten") == 0) return nullptr;
  void* lib = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
  if (lib == nullptr) return nullptr;
  // at::native::mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result,
  //                           float beta, float alpha)
  return reinterpret_cast<OnednnMatmul>(
      dlsym(lib, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"));
}

// Set once oneDNN's entry point refused this CPU (see above).
inline std::atomic<bool>& onednn_refused() {
  static std::atomic<bool> refused{false};
  return refused;
}

inline void tile_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta,
                      double alpha) {
  static const OnednnMatmul onednn = find_onednn_matmul();
  // alpha = 0 (a zero scale) goes to addmm: that oneDNN entry point then left `out` as it was
  // (stale tile contents) instead of beta * out.
  if (onednn != nullptr && !onednn_refused().load(std::memory_order_relaxed) && alpha != 0.0 &&
      out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat) {
    try {
      onednn(a, b, out, static_cast<float>(beta), static_cast<float>(alpha));
      return;
    } catch (const c10::Error&) {
      onednn_refused().store(true, std::memory_order_relaxed);  // this CPU: addmm from now on
    }
  }
  at::Tensor o = out;
  at::addmm_out(o, out, a, b, beta, alpha);
}

// The GEMM the fp32 tiles take here: "onednn" or "aten" (one 2 x 2 product decides, as the tiles'
// first product would).
inline std::string tile_gemm_name() {
  const at::Tensor a = at::ones({2, 2}, at::kFloat);
  tile_gemm(at::empty({2, 2}, at::kFloat), a, a, 0.0, 1.0);
  return find_onednn_matmul() != nullptr && !onednn_refused().load() ? "onednn" : "aten";
}

}  // namespace fastcl
