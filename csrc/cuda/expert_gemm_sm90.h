// Hopper (sm_90a) grouped expert GEMM built on CUTLASS 3.x; see expert_gemm_sm90.cu.
#pragma once

#include <ATen/ATen.h>

namespace molm::cuda {

// out[rows of e] = act(x[rows of e] @ weight[e]) for bf16/fp16 with one CUTLASS ptr-array grouped GEMM (TMA +
// wgmma), problem sizes filled on the device from expert_offsets (no host sync). Returns false without launching
// anything when the build has no CUTLASS or the inputs do not meet its layout/alignment needs (the caller falls
// back to the WMMA tiles). Call only on a compute-capability 9.x device.
bool expert_gemm_sm90(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets, bool gelu,
                      at::Tensor& out);

}  // namespace molm::cuda
