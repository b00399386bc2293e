// Shared host helpers of the CUDA kernels: launch checks, the opt-in host-side value checks, the element-type map.
// The device-side helpers live in device.cuh (ATen-free, so the CPU emulator compiles them).
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

#include "../checks.h"
#include "../kernel_options.h"
#include "device.cuh"

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
  read_expert_offsets(op, expert_offsets.cpu(), m);  // the same checks and messages as the CPU kernels
}

// The element type as the kernels see it: c10's 16-bit types as CUDA's (same bits).
template <typename scalar_t>
using device_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, __nv_bfloat16,
                                    std::conditional_t<std::is_same_v<scalar_t, c10::Half>, __half, scalar_t>>;

}  // namespace molm::cuda
