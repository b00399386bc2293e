// route_topk's outputs, allocated the same way for the CPU (csrc/cpu/routing.cpp) and CUDA (csrc/cuda/routing.cu)
// kernels. probs is ATen's softmax in the logits dtype (fp32 internally for bf16/fp16, then rounded), so it equals
// torch.softmax(logits, -1) bit for bit; the other tensors are left for the kernel to fill.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace molm {

using RouteOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// logits [N, E] -> (probs [N, E], gates [N, k], experts [N, k] int64, sorted_slots [M], slot_positions [M],
// expert_offsets [E + 1]) with M = N * k.
inline RouteOutputs route_outputs(const at::Tensor& logits, int64_t k) {
  const int64_t n_tokens = logits.size(0), n_experts = logits.size(1), m = n_tokens * k;
  const auto index = logits.options().dtype(at::kLong);
  return {at::_softmax(logits.contiguous(), -1, false),
          at::empty({n_tokens, k}, logits.options()),
          at::empty({n_tokens, k}, index),
          at::empty({m}, index),
          at::empty({m}, index),
          at::empty({n_experts + 1}, index)};
}

}  // namespace molm
