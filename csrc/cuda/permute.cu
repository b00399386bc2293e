// CUDA gather / scatter between token order and expert-sorted order: argument checks and allocation around the
// kernels of permute.cuh (which the CPU emulator also runs).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"
#include "permute.cuh"

namespace molm::cuda {
namespace {

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& index, int64_t group) {
  check_gather_rows(x, index, group);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = index.numel(), n_rows = x.size(0), c = x.size(1);
  if (value_checks_enabled())
    check_index_range("molm::gather_rows", "index", index, n_rows * group,
                      ": with x.size(0) = " + std::to_string(n_rows) + " and group = " + std::to_string(group) +
                          " valid values are ");
  at::Tensor out = at::empty({m, c}, x.options());  // [M, C]
  if (m == 0 || c == 0) return out;
  MOLM_DISPATCH_FLOATING(x.scalar_type(), "molm::gather_rows", [&] {
    using T = device_t<scalar_t>;
    permute::launch_gather<T>(reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), index.data_ptr<int64_t>(), m,
                              group, n_rows, c, reinterpret_cast<T*>(out.data_ptr()), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor scatter_ksum_cuda(const at::Tensor& y, const at::Tensor& gates, const at::Tensor& slot_positions) {
  check_scatter_ksum(y, gates, slot_positions);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t m = y.size(0), n_tokens = gates.size(0), k = gates.size(1), width = y.size(1);
  if (value_checks_enabled()) check_index_range("molm::scatter_ksum", "slot_positions", slot_positions, m, " ");
  at::Tensor out = at::empty({n_tokens, width}, y.options());  // [N, C]
  if (out.numel() == 0) return out;
  MOLM_DISPATCH_FLOATING(y.scalar_type(), "molm::scatter_ksum", [&] {
    using T = device_t<scalar_t>;
    using acc_t = acc_type<scalar_t>;
    const at::Tensor g = gates.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // [N, k]
    permute::launch_scatter_ksum<T>(reinterpret_cast<const T*>(y.data_ptr()), y.stride(0), g.data_ptr<acc_t>(),
                                    slot_positions.data_ptr<int64_t>(), n_tokens, k, m, width,
                                    reinterpret_cast<T*>(out.data_ptr()), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace molm::cuda

TORCH_LIBRARY_IMPL(molm, CUDA, m) {
  m.impl("gather_rows", &molm::cuda::gather_rows_cuda);
  m.impl("scatter_ksum", &molm::cuda::scatter_ksum_cuda);
}
