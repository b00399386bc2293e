// Shared helpers of the CUDA kernels: launch checks, the opt-in host-side value checks, and small device math.
//
// The CUDA ops never synchronise with the host (so they can be captured in a CUDA graph). That means index and
// offset *values* (which need the data) are not validated by default: out-of-range values are made memory-safe
// instead (a gathered/scattered row becomes NaN, expert offsets are clamped to [0, M]).
// molm.ops.set_kernel_options(value_checks=True) copies them to the host and raises the CPU kernels' exact errors
// (one device->host sync per op).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "../kernel_options.h"

namespace molm::cuda {

inline bool value_checks_enabled() { return kernel_options().value_checks.load(std::memory_order_relaxed); }

// Same messages as csrc/cpu/permute.cpp and csrc/cpu/expert_gemm.cpp: "<op>: <arg>[i] = v is out of range<what>0..L-1".
inline void check_index_range(const char* op, const char* arg, const at::Tensor& index, int64_t limit,
                              const std::string& valid_what) {
  const at::Tensor h = index.cpu();
  const int64_t* p = h.data_ptr<int64_t>();
  for (int64_t i = 0; i < h.numel(); ++i)
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < limit, op, ": ", arg, "[", i, "] = ", p[i], " is out of range", valid_what,
                      "0..", limit - 1);
}

inline void check_offsets(const char* op, const at::Tensor& expert_offsets, int64_t m) {
  const at::Tensor h = expert_offsets.cpu();
  const int64_t* b = h.data_ptr<int64_t>();
  const int64_t n = h.numel();
  TORCH_CHECK_VALUE(b[0] == 0 && b[n - 1] == m, op, ": expert_offsets must start at 0 and end at x.size(0) = ", m,
                    ", got ", b[0], " .. ", b[n - 1]);
  for (int64_t e = 0; e + 1 < n; ++e)
    TORCH_CHECK_VALUE(b[e] <= b[e + 1], op, ": expert_offsets must be non-decreasing, got offsets[", e, "] = ", b[e],
                      " > offsets[", e + 1, "] = ", b[e + 1]);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest grid.x and grid.y / grid.z extents.
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;

}  // namespace molm::cuda

// Device-side helpers (compiled by nvcc only).
namespace molm::cuda::dev {

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fffffff); }

// GPT-2's tanh GELU ("gelu_new"), in fp32 (fp64 for double), as ATen's gelu(approximate="tanh").
__device__ __forceinline__ float gelu_new(float x) {
  const float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  const float inner = kBeta * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + tanhf(inner));
}
__device__ __forceinline__ double gelu_new(double x) {
  const double kBeta = 0.7978845608028654;
  const double inner = kBeta * (x + 0.044715 * x * x * x);
  return 0.5 * x * (1.0 + tanh(inner));
}

// acc + a * b rounded twice (no FMA contraction), the way an eager `out += g * y` in torch rounds.
__device__ __forceinline__ float mul_add_rn(float acc, float a, float b) { return __fadd_rn(acc, __fmul_rn(a, b)); }
__device__ __forceinline__ double mul_add_rn(double acc, double a, double b) {
  return __dadd_rn(acc, __dmul_rn(a, b));
}

}  // namespace molm::cuda::dev
