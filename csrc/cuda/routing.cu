// CUDA routing: softmax (ATen's, so probs equal torch.softmax bit for bit, as on the CPU), then the top-k, histogram,
// scan and placement kernels of routing.cuh (which the CPU emulator also runs), with no host synchronisation.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../dispatch.h"
#include "../routing_common.h"
#include "common.cuh"
#include "routing.cuh"

namespace molm::cuda {
namespace {

using routing::kMaxExperts;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_topk_cuda(
    const at::Tensor& logits, int64_t k) {
  check_route_topk(logits, k);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n_tokens = logits.size(0), n_experts = logits.size(1), m = n_tokens * k;
  TORCH_CHECK_VALUE(n_experts <= kMaxExperts, "molm::route_topk: the CUDA kernel supports up to ", kMaxExperts,
                    " experts, got E = ", n_experts);
  TORCH_CHECK_VALUE(m < (int64_t(1) << 31), "molm::route_topk: N*k = ", m, " slots exceed the CUDA kernel's 2^31");
  at::Tensor probs, gates, experts, sorted_slots, slot_positions, expert_offsets;
  std::tie(probs, gates, experts, sorted_slots, slot_positions, expert_offsets) = route_outputs(logits, k);
  at::Tensor hist = at::empty({routing::hist_elems(n_tokens, n_experts)}, experts.options().dtype(at::kInt));
  MOLM_DISPATCH_FLOATING(logits.scalar_type(), "molm::route_topk", [&] {
    // c10's 16-bit types: topk_row converts them to float as on the CPU
    routing::launch_route(probs.data_ptr<scalar_t>(), n_tokens, n_experts, k, gates.data_ptr<scalar_t>(),
                          experts.data_ptr<int64_t>(), hist.data_ptr<int>(), sorted_slots.data_ptr<int64_t>(),
                          slot_positions.data_ptr<int64_t>(), expert_offsets.data_ptr<int64_t>(),
                          at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {probs, gates, experts, sorted_slots, slot_positions, expert_offsets};
}

}  // namespace
}  // namespace molm::cuda

TORCH_LIBRARY_IMPL(molm, CUDA, m) { m.impl("route_topk", &molm::cuda::route_topk_cuda); }
