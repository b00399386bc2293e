// CUDA kernels of the int8 weight-only ops: the weights are dequantised to x's dtype (one elementwise pass) and the
// 16-bit kernels run on them: molm::expert_gemm for the experts, cuBLAS for linear. Correct and capture-safe (no
// host sync), but it reads the int8 weights and writes and reads a 16-bit copy, so on a GPU int8 saves memory, not
// time; a kernel that widens int8 in registers is the next step.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../moe_compose.h"

namespace molm::cuda {
namespace {

at::Tensor expert_gemm_q8_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                               const at::Tensor& expert_offsets, c10::string_view activation) {
  check_expert_gemm_q8(x, qweight, scale, expert_offsets, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  // [E, N, K] -> the [E, K, N] view expert_gemm takes (a transposed weight is one of its supported layouts)
  const at::Tensor w = (qweight.to(at::kFloat) * scale.to(at::kFloat).unsqueeze(2)).to(x.scalar_type()).transpose(1, 2);
  return call_expert_projection(x, w, c10::nullopt, expert_offsets, activation);
}

at::Tensor linear_q8_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias) {
  check_linear_q8(x, qweight, scale, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = (qweight.to(at::kFloat) * scale.to(at::kFloat).unsqueeze(1)).to(x.scalar_type());
  return at::linear(x, w, bias);
}

}  // namespace
}  // namespace molm::cuda

TORCH_LIBRARY_IMPL(molm, CUDA, m) {
  m.impl("expert_gemm_q8", &molm::cuda::expert_gemm_q8_cuda);
  m.impl("linear_q8", &molm::cuda::linear_q8_cuda);
}
