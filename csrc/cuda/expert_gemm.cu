// CUDA grouped expert GEMM and its weight gradient: argument checks, path choice (GEMV, tile kernels, or the
// CUTLASS sm_90a grouped GEMM) and allocation around the kernels of expert_gemm.cuh (which the CPU emulator also
// runs; the paths are described there).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"
#include "expert_gemm.cuh"
#include "expert_gemm_sm90.h"

namespace molm::cuda {
namespace {

using namespace expert_gemm;

// CUTLASS sm_90a grouped GEMM (expert_gemm_sm90.cu) on compute capability 9.0 for every row count above the GEMV
// range: on an H200 it beat the WMMA tiles 1.6-4x at 128 rows (bench/gpu_bench_moe.py), and below that both pad
// each expert's rows to one 128-row tile, so neither gets cheaper. set_kernel_options(sm90_gemm="off") turns it
// off; "on" also takes it for small M that the GEMV refuses (tests).
constexpr int64_t kSm90MinM = kGemvMaxM + 1;

bool use_sm90_gemm(const at::Tensor& x, int64_t m) {
  const int choice = kernel_options().sm90_gemm.load(std::memory_order_relaxed);
  if (choice < 0) return false;
  const bool forced = choice > 0;
  // sm_90a code runs on compute capability 9.0 only
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(x.get_device());
  return (forced || m >= kSm90MinM) && prop->major == 9 && prop->minor == 0;
}

bool tensor_cores_ok(const at::Tensor& t) { return at::cuda::getDeviceProperties(t.get_device())->major >= 8; }

at::Tensor expert_gemm_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets,
                            c10::string_view activation) {
  check_expert_gemm(x, weight, expert_offsets, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), kdim = x.size(1), n_experts = weight.size(0), n_out = weight.size(2);
  if (value_checks_enabled()) check_offsets("molm::expert_gemm", expert_offsets, m);
  at::Tensor out = at::empty({m, n_out}, x.options());  // [M, Nout]
  if (out.numel() == 0) return out;
  if (kdim == 0) return out.zero_();  // empty sums; gelu_new(0) == 0
  TORCH_CHECK_VALUE(n_experts <= kMaxGridYZ, "molm::expert_gemm: the CUDA kernel supports up to ", kMaxGridYZ,
                    " experts, got ", n_experts);
  const bool gelu = activation == "gelu_new";
  const auto stream = at::cuda::getCurrentCUDAStream();
  MOLM_DISPATCH_FLOATING(x.scalar_type(), "molm::expert_gemm", [&] {
    using T = device_t<scalar_t>;
    if constexpr (kUseWmma<T>)
      TORCH_CHECK_VALUE(tensor_cores_ok(x),
                        "molm::expert_gemm: 16-bit inputs need a GPU of compute capability "
                        ">= 8.0 (bf16/fp16 tensor cores)");
    const GemmArgs<T> args{reinterpret_cast<const T*>(x.data_ptr()),
                           x.stride(0),
                           reinterpret_cast<const T*>(weight.data_ptr()),
                           weight.stride(0),
                           weight.stride(1),
                           weight.stride(2),
                           expert_offsets.data_ptr<int64_t>(),
                           n_experts,
                           m,
                           kdim,
                           n_out,
                           gelu,
                           reinterpret_cast<T*>(out.data_ptr())};
    if (use_gemv(args)) {
      at::Tensor partial = at::empty({gemv_workspace_elems(m, kdim, n_out)}, x.options().dtype(at::kFloat));
      launch_gemv(args, partial.data_ptr<float>(), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if constexpr (kUseWmma<T>) {
      if (use_sm90_gemm(x, m) && expert_gemm_sm90(x, weight, expert_offsets, gelu, out)) return;
    }
    launch_tiles(args, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor expert_gemm_wgrad_cuda(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& expert_offsets,
                                  int64_t num_experts) {
  check_expert_gemm_wgrad(x, grad_out, expert_offsets, num_experts);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), kdim = x.size(1), n_out = grad_out.size(1);
  if (value_checks_enabled()) check_offsets("molm::expert_gemm_wgrad", expert_offsets, m);
  at::Tensor grad_w = at::empty({num_experts, kdim, n_out}, x.options());  // [E, K, Nout]
  if (grad_w.numel() == 0) return grad_w;
  TORCH_CHECK_VALUE(num_experts <= kMaxGridYZ, "molm::expert_gemm_wgrad: the CUDA kernel supports up to ", kMaxGridYZ,
                    " experts, got ", num_experts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  MOLM_DISPATCH_FLOATING(x.scalar_type(), "molm::expert_gemm_wgrad", [&] {
    using T = device_t<scalar_t>;
    if constexpr (kUseWmma<T>)
      TORCH_CHECK_VALUE(tensor_cores_ok(x),
                        "molm::expert_gemm_wgrad: 16-bit inputs need a GPU of compute "
                        "capability >= 8.0 (bf16/fp16 tensor cores)");
    TORCH_CHECK_VALUE(ceil_div(kdim, kTileM<T>) <= kMaxGridYZ, "molm::expert_gemm_wgrad: x.size(1) = ", kdim,
                      " is too large");
    launch_wgrad(reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), x.stride(1),
                 reinterpret_cast<const T*>(grad_out.data_ptr()), grad_out.stride(0), grad_out.stride(1),
                 expert_offsets.data_ptr<int64_t>(), num_experts, m, kdim, n_out,
                 reinterpret_cast<T*>(grad_w.data_ptr()), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_w;
}

}  // namespace
}  // namespace molm::cuda

TORCH_LIBRARY_IMPL(molm, CUDA, m) {
  m.impl("expert_gemm", &molm::cuda::expert_gemm_cuda);
  m.impl("expert_gemm_wgrad", &molm::cuda::expert_gemm_wgrad_cuda);
}
