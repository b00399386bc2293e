// CPU routing: softmax (ATen's, so probs match torch.softmax bitwise), top-k per token, stable counting sort.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../routing_common.h"
#include "../dispatch.h"
#include "core/routing_core.h"

namespace molm::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_topk_cpu(
    const at::Tensor& logits, int64_t k) {
  check_route_topk(logits, k);
  const int64_t n_tokens = logits.size(0), n_experts = logits.size(1), m = n_tokens * k;
  at::Tensor probs, gates, experts, sorted_slots, slot_positions, expert_offsets;
  std::tie(probs, gates, experts, sorted_slots, slot_positions, expert_offsets) = route_outputs(logits, k);
  int64_t* ex = experts.data_ptr<int64_t>();
  MOLM_DISPATCH_FLOATING(logits.scalar_type(), "molm::route_topk", [&] {
    const scalar_t* p = probs.data_ptr<scalar_t>();
    scalar_t* g = gates.data_ptr<scalar_t>();
    at::parallel_for(0, n_tokens, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) core::topk_row(p + n * n_experts, n_experts, k, g + n * k, ex + n * k);
    });
  });
  core::counting_sort(ex, m, n_experts, sorted_slots.data_ptr<int64_t>(), slot_positions.data_ptr<int64_t>(),
                      expert_offsets.data_ptr<int64_t>());
  return {probs, gates, experts, sorted_slots, slot_positions, expert_offsets};
}

}  // namespace
}  // namespace molm::cpu

TORCH_LIBRARY_IMPL(molm, CPU, m) { m.impl("route_topk", &molm::cpu::route_topk_cpu); }
