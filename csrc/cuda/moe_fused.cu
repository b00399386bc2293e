// CUDA implementation of the fused MoE ops (moe_map, moe_reduce, moe_mlp), composed from molm's CUDA grouped-GEMM
// kernels (gather_rows -> expert_gemm / expert_gemm_q8 -> gather_rows / scatter_ksum; moe_compose.h): the same
// results and the same determinism as those kernels, no host sync, capture-safe. The rows are still gathered into
// expert order on this path; reading them through the slot ids inside the GEMM kernels is the GPU's next step.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../moe_compose.h"

namespace molm::cuda {
namespace {

at::Tensor moe_map_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                        const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                        const at::Tensor& expert_offsets, int64_t k, c10::string_view activation) {
  check_moe_map(x, weight, scale, sorted_slots, slot_positions, expert_offsets, k, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  return moe_map_composed(x, weight, scale, sorted_slots, slot_positions, expert_offsets, k, activation);
}

at::Tensor moe_reduce_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                           const at::Tensor& gates, const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                           const at::Tensor& expert_offsets) {
  check_moe_reduce(x, weight, scale, gates, sorted_slots, slot_positions, expert_offsets);
  const c10::cuda::CUDAGuard guard(x.device());
  return moe_reduce_composed(x, weight, scale, gates, sorted_slots, slot_positions, expert_offsets);
}

at::Tensor moe_mlp_cuda(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& scale1,
                        const at::Tensor& w2, const c10::optional<at::Tensor>& scale2, const at::Tensor& gates,
                        const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                        const at::Tensor& expert_offsets, c10::string_view activation) {
  check_moe_mlp(x, w1, scale1, w2, scale2, gates, sorted_slots, slot_positions, expert_offsets, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  return moe_mlp_composed(x, w1, scale1, w2, scale2, gates, sorted_slots, slot_positions, expert_offsets, activation);
}

}  // namespace
}  // namespace molm::cuda

TORCH_LIBRARY_IMPL(molm, CUDA, m) {
  m.impl("moe_map", &molm::cuda::moe_map_cuda);
  m.impl("moe_reduce", &molm::cuda::moe_reduce_cuda);
  m.impl("moe_mlp", &molm::cuda::moe_mlp_cuda);
}
