// Kernel path choices that users, tests and benchmarks switch from Python (molm.ops.set_kernel_options), read by
// the host code of the CUDA ops at each call. Process-wide; a CUDA graph replays the paths it was captured with.
#pragma once

#include <atomic>

namespace molm {

struct KernelOptions {
  // CUTLASS sm_90a grouped GEMM: 0 above the GEMV range (default), 1 for any M above the GEMV range, -1 never
  std::atomic<int> sm90_gemm{0};
  std::atomic<bool> sb_fused{true};  // fused tensor-core prefill (false: the cuBLAS-tiled path)
  // fused tensor-core backward; off by default: on an H200 the cuBLAS-tiled backward measured 3x faster
  std::atomic<bool> sb_fused_backward{false};
  std::atomic<bool> sb_early_exit{true};  // fused prefill stops once the stick left is below e^-30
  std::atomic<bool> value_checks{false};  // copy indices/offsets to the host and raise exact errors (a sync per op)
};

KernelOptions& kernel_options();

}  // namespace molm
