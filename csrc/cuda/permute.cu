// CUDA gather / scatter between token order and expert-sorted order. One block per row (grid-stride), threads
// across the row in 16-byte vectors when the row allows it. No atomics: scatter_ksum sums the k slots of a token
// in slot order in fp32 (fp64 for fp64) inside one thread, so results are bitwise repeatable and equal the
// reference's `out += g * y` (products and sums rounded separately, no FMA contraction).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"

namespace molm::cuda {
namespace {

constexpr int kRowThreads = 128;
constexpr int64_t kMaxRowBlocks = 1 << 16;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16 bytes of NaN in the element type (the bit pattern repeats every element, so any aligned unit of it is NaN).
uint4 nan_pattern(at::ScalarType t) {
  uint4 v;
  switch (t) {
    case at::kBFloat16: v.x = v.y = v.z = v.w = 0x7fc07fc0u; break;
    case at::kHalf: v.x = v.y = v.z = v.w = 0x7e007e00u; break;
    case at::kFloat: v.x = v.y = v.z = v.w = 0x7fc00000u; break;
    default: v.x = v.z = 0x00000000u; v.y = v.w = 0x7ff80000u; break;  // double, little endian
  }
  return v;
}

// out[i] = x[index[i] / group], copied in units of Unit (uint4 = 16 bytes when aligned, else one element).
// An out-of-range index gives a NaN row (memory-safe; set_kernel_options(value_checks=True) raises instead).
template <typename Unit>
__global__ void gather_rows_kernel(const Unit* __restrict__ x, int64_t x_row_units, const int64_t* __restrict__ index,
                                   int64_t m, int64_t group, int64_t limit, int64_t row_units, Unit nan_unit,
                                   Unit* __restrict__ out) {
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const int64_t v = index[i];
    Unit* dst = out + i * row_units;
    if (v < 0 || v >= limit) {
      for (int64_t c = threadIdx.x; c < row_units; c += blockDim.x) dst[c] = nan_unit;
      continue;
    }
    const Unit* src = x + (v / group) * x_row_units;
    for (int64_t c = threadIdx.x; c < row_units; c += blockDim.x) dst[c] = src[c];
  }
}

template <typename Unit>
void launch_gather(const at::Tensor& x, const at::Tensor& index, int64_t group, at::Tensor& out) {
  const int64_t esize = x.element_size(), m = index.numel();
  const int64_t unit_elems = int64_t(sizeof(Unit)) / esize;
  const uint4 pat = nan_pattern(x.scalar_type());
  Unit nan_unit;
  static_assert(sizeof(Unit) <= sizeof(uint4));
  std::memcpy(&nan_unit, &pat, sizeof(Unit));
  const auto stream = at::cuda::getCurrentCUDAStream();
  gather_rows_kernel<Unit><<<static_cast<unsigned>(std::min(m, kMaxRowBlocks)), kRowThreads, 0, stream>>>(
      reinterpret_cast<const Unit*>(x.data_ptr()), x.stride(0) / unit_elems, index.data_ptr<int64_t>(), m, group,
      x.size(0) * group, x.size(1) / unit_elems, nan_unit, reinterpret_cast<Unit*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

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
  const int64_t esize = x.element_size();
  const bool vec = (c * esize) % 16 == 0 && (x.stride(0) * esize) % 16 == 0 && aligned16(x.data_ptr());
  if (vec) {
    launch_gather<uint4>(x, index, group, out);
  } else if (esize == 2) {
    launch_gather<uint16_t>(x, index, group, out);
  } else if (esize == 4) {
    launch_gather<uint32_t>(x, index, group, out);
  } else {
    launch_gather<uint64_t>(x, index, group, out);
  }
  return out;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// out[n] = sum_j gates[n, j] * y[pos[n*k + j]], j = 0..k-1 in order; gates are already in acc_t. Each thread owns
// VEC consecutive columns. An out-of-range position makes the token's row NaN.
template <typename scalar_t, int VEC>
__global__ void scatter_ksum_kernel(const scalar_t* __restrict__ y, int64_t y_stride, const acc_type<scalar_t>* gates,
                                    const int64_t* __restrict__ pos, int64_t n_tokens, int64_t k, int64_t m,
                                    int64_t width, scalar_t* __restrict__ out) {
  using acc_t = acc_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  for (int64_t n = blockIdx.x; n < n_tokens; n += gridDim.x) {
    bool bad = false;
    for (int64_t j = 0; j < k; ++j) bad |= pos[n * k + j] < 0 || pos[n * k + j] >= m;
    for (int64_t c = int64_t(threadIdx.x) * VEC; c < width; c += int64_t(blockDim.x) * VEC) {
      acc_t acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] = acc_t(0);
      if (!bad) {
        for (int64_t j = 0; j < k; ++j) {
          const acc_t g = gates[n * k + j];
          const P row = *reinterpret_cast<const P*>(y + pos[n * k + j] * y_stride + c);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] = dev::mul_add_rn(acc[v], g, static_cast<acc_t>(row.v[v]));
        }
      }
      P o;
#pragma unroll
      for (int v = 0; v < VEC; ++v) o.v[v] = static_cast<scalar_t>(bad ? acc_t(dev::nan_f()) : acc[v]);
      *reinterpret_cast<P*>(out + n * width + c) = o;
    }
  }
}

at::Tensor scatter_ksum_cuda(const at::Tensor& y, const at::Tensor& gates, const at::Tensor& slot_positions) {
  check_scatter_ksum(y, gates, slot_positions);
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t m = y.size(0), n_tokens = gates.size(0), k = gates.size(1), width = y.size(1);
  if (value_checks_enabled()) check_index_range("molm::scatter_ksum", "slot_positions", slot_positions, m, " ");
  at::Tensor out = at::empty({n_tokens, width}, y.options());  // [N, C]
  if (out.numel() == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  MOLM_DISPATCH_FLOATING(y.scalar_type(), "molm::scatter_ksum", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor g = gates.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // [N, k]
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = width % kVec == 0 && (y.stride(0) % kVec) == 0 && aligned16(y.data_ptr());
    const int blocks = static_cast<int>(std::min(n_tokens, kMaxRowBlocks));
    if (vec) {
      scatter_ksum_kernel<scalar_t, kVec><<<blocks, kRowThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), y.stride(0), g.data_ptr<acc_t>(), slot_positions.data_ptr<int64_t>(), n_tokens,
          k, m, width, out.data_ptr<scalar_t>());
    } else {
      scatter_ksum_kernel<scalar_t, 1><<<blocks, kRowThreads, 0, stream>>>(
          y.data_ptr<scalar_t>(), y.stride(0), g.data_ptr<acc_t>(), slot_positions.data_ptr<int64_t>(), n_tokens,
          k, m, width, out.data_ptr<scalar_t>());
    }
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
