// CUDA kernel of molm::linear: cuBLAS through at::linear (its GEMV for decode-sized inputs already streams the
// weight at memory speed, and 16-bit inputs use the tensor cores with fp32 accumulation).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"

namespace molm::cuda {
namespace {

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       c10::string_view activation) {
  check_linear(x, weight, bias, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::linear(x, weight, bias);
  return activation == "gelu" ? at::gelu_(y) : y;
}

}  // namespace
}  // namespace molm::cuda

TORCH_LIBRARY_IMPL(molm, CUDA, m) { m.impl("linear", &molm::cuda::linear_cuda); }
