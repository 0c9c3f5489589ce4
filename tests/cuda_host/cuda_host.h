// Runs the plain-CUDA kernels of csrc/cuda on the CPU, for tests on machines without a GPU.
//
// tests/_cuda_host.py rewrites each `kernel<<<grid, block, shmem, stream>>>(args);` into
// `::cuda_host::launch(grid, block, shmem, stream, [&] { kernel(args); });` and compiles the .cu
// file as C++ with this header forced in and the shims of tests/cuda_host/include (cuda_runtime.h,
// cuda_fp16.h, ...) on the include path.
//
// Each GPU thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another.
// A fiber runs until it reaches a barrier (__syncthreads, __syncwarp, a shuffle), so memory
// written before a barrier is visible after it and nothing else is ordered: a kernel that
// relies on lockstep execution without a barrier reads stale or clobbered data here.  Threads
// and blocks run in ascending or descending order (``reverse``) to vary the interleaving.
//
// Misuse that is undefined on a GPU is a launch failure with a message: a barrier some lanes of
// a full-mask warp op never reach, a deadlock, a bad launch configuration or a block bigger than
// the kernel's __launch_bounds__, and (with -fsanitize=alignment, handler in kernels_capi.cpp)
// a misaligned vector access.
//
// Not seen here: races between fibers that need no barrier (a non-atomic read-modify-write of one
// address by many threads never loses an update; the kernels use no atomics), a dependence
// between blocks (they run in order), shared memory read before it is written (__shared__
// variables are statics: zero at first, then what the last block left; GCC ignores a section
// attribute on statics of templates, so they cannot be poisoned as a group), and writes past a
// buffer (the tests surround outputs with NaN and check them where they can).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)  // checked at launch instead (tests/_cuda_host.py passes the bound)
#define __shared__ static  // blocks run one at a time, so one copy serves every block

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaStream_t = void*;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
// The fast division intrinsic (2 ulp on a GPU), exact here.
inline float __fdividef(float a, float b) { return a / b; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }

namespace cuda_host {

enum Wait { kReady, kWarp, kBlock, kDone };

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int linear = 0, warp = 0, lane = 0, phase = 0;
  Wait wait = kReady;
};

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 128 * 1024;

struct State {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<unsigned char> slots[2];  // shuffle exchange, 8 bytes per thread, double-buffered
  Fiber* cur = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  const std::function<void()>* body = nullptr;
  bool reverse = false, failed = false;
  std::string error;
  cudaError_t last = cudaSuccess;
  int64_t launches = 0;
};

inline State& state() {
  static State s;
  return s;
}

inline void fiber_main() {
  State& s = state();
  (*s.body)();
  s.cur->wait = kDone;  // uc_link returns to the scheduler
}

inline void park(Wait w) {
  State& s = state();
  Fiber* f = s.cur;
  f->wait = w;
  swapcontext(&f->ctx, &s.scheduler);
}

// A device-side error: the launch stops and reports `msg`.
inline void fail(const std::string& msg) {
  State& s = state();
  if (!s.failed) {
    s.failed = true;
    s.error = msg;
  }
  park(kDone);
}

inline std::string where(const Fiber& f) {
  const State& s = state();
  return "block (" + std::to_string(s.block_idx.x) + "," + std::to_string(s.block_idx.y) + "," +
         std::to_string(s.block_idx.z) + ") thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) +
         "," + std::to_string(f.tid.z) + ")";
}

// Releases the barriers every live thread of a warp (or of the block) has reached.
inline bool release() {
  State& s = state();
  bool any = false;
  const int n = static_cast<int>(s.fibers.size());
  for (int w0 = 0; w0 < n; w0 += kWarpSize) {
    int waiting = 0, done = 0, lanes = 0;
    for (int i = w0; i < n && i < w0 + kWarpSize; ++i, ++lanes) {
      waiting += s.fibers[i].wait == kWarp;
      done += s.fibers[i].wait == kDone;
    }
    if (waiting == 0) continue;
    if (waiting + done == lanes && done > 0) {
      s.failed = true;
      s.error = "a warp-synchronous op (__syncwarp or a full-mask shuffle) that exited lanes never reach, " +
                where(s.fibers[w0]);
      return false;
    }
    if (waiting == lanes) {
      for (int i = w0; i < w0 + lanes; ++i) s.fibers[i].wait = kReady;
      any = true;
    }
  }
  if (any) return true;
  int at_block = 0, done = 0;
  for (const Fiber& f : s.fibers) {
    at_block += f.wait == kBlock;
    done += f.wait == kDone;
  }
  if (at_block > 0 && at_block + done == n) {
    for (Fiber& f : s.fibers)
      if (f.wait == kBlock) f.wait = kReady;
    return true;
  }
  return false;
}

inline void run_block() {
  State& s = state();
  const int n = static_cast<int>(s.block_dim.x * s.block_dim.y * s.block_dim.z);
  s.fibers.assign(n, Fiber{});
  while (static_cast<int>(s.stacks.size()) < n) s.stacks.emplace_back(new char[kStackBytes]);
  for (int i = 0; i < 2; ++i) s.slots[i].assign(static_cast<size_t>(n) * 8, 0);
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.linear = i;
    f.tid = dim3(i % s.block_dim.x, (i / s.block_dim.x) % s.block_dim.y, i / (s.block_dim.x * s.block_dim.y));
    f.warp = i / kWarpSize;
    f.lane = i % kWarpSize;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = s.stacks[i].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &s.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (;;) {
    bool alive = false;
    for (int k = 0; k < n && !s.failed; ++k) {
      Fiber& f = s.fibers[s.reverse ? n - 1 - k : k];
      if (f.wait != kReady) continue;
      s.cur = &f;
      swapcontext(&s.scheduler, &f.ctx);
      s.cur = nullptr;
    }
    if (s.failed) return;
    for (const Fiber& f : s.fibers) alive = alive || f.wait != kDone;
    if (!alive) return;
    if (!release()) {
      if (!s.failed) {
        s.failed = true;
        s.error = "deadlock: threads wait at barriers that the others never reach";
      }
      return;
    }
  }
}

inline bool valid_config(dim3 g, dim3 b, unsigned max_threads) {
  const uint64_t threads = static_cast<uint64_t>(b.x) * b.y * b.z;
  return threads >= 1 && threads <= max_threads && threads <= 1024 && b.x <= 1024 && b.y <= 1024 && b.z <= 64 && g.x >= 1 && g.y >= 1 &&
         g.z >= 1 && g.x <= 0x7fffffffu && g.y <= 65535 && g.z <= 65535;
}

// Runs body once per thread of every block, synchronously; max_threads is the kernel's
// __launch_bounds__ (a GPU refuses a bigger block).
inline void launch(dim3 grid, dim3 block, size_t shmem, cudaStream_t, const std::function<void()>& body,
                   unsigned max_threads = 1024) {
  State& s = state();
  ++s.launches;
  s.failed = false;
  s.error.clear();
  if (!valid_config(grid, block, max_threads) || shmem > 48 * 1024) {
    s.last = cudaErrorInvalidConfiguration;
    return;
  }
  s.body = &body;
  s.grid_dim = grid;
  s.block_dim = block;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t b = s.reverse ? blocks - 1 - i : i;
    s.block_idx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                       static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y)));
    run_block();
    if (s.failed) {
      s.last = cudaErrorLaunchFailure;
      return;
    }
  }
}

}  // namespace cuda_host

#define threadIdx (::cuda_host::state().cur->tid)
#define blockIdx (::cuda_host::state().block_idx)
#define blockDim (::cuda_host::state().block_dim)
#define gridDim (::cuda_host::state().grid_dim)

inline void __syncthreads() { ::cuda_host::park(::cuda_host::kBlock); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::cuda_host::fail("__syncwarp with a partial mask is not emulated");
  ::cuda_host::park(::cuda_host::kWarp);
}

// One barrier per shuffle: slots alternate, and a lane can only reuse a slot after every lane
// of its warp passed the next shuffle's barrier, i.e. finished reading this one.
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  auto& s = ::cuda_host::state();
  if (mask != 0xffffffffu || width != 32) ::cuda_host::fail("only full-mask, full-width shuffles are emulated");
  ::cuda_host::Fiber* f = s.cur;
  const int ph = f->phase;
  f->phase ^= 1;
  std::memcpy(&s.slots[ph][static_cast<size_t>(f->linear) * 8], &v, sizeof(T));
  ::cuda_host::park(::cuda_host::kWarp);
  f = s.cur;
  const int src = f->warp * ::cuda_host::kWarpSize + (f->lane ^ lane_mask);
  if (src >= static_cast<int>(s.fibers.size())) return v;
  T out;
  std::memcpy(&out, &s.slots[ph][static_cast<size_t>(src) * 8], sizeof(T));
  return out;
}

inline cudaError_t cudaGetLastError() {
  auto& s = ::cuda_host::state();
  const cudaError_t e = s.last;
  s.last = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return ::cuda_host::state().error.c_str();
  }
  return "unknown error";
}
