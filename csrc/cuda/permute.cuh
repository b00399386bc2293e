// Gather / scatter between token order and expert-sorted order: kernels and launch decisions, free of ATen so that
// the CPU emulator (tests/cuda_emu/) runs them in tests/test_permute_emu.py. One block per row (grid-stride), threads
// across the row in 16-byte vectors when the row allows it. No atomics: scatter_ksum sums the k slots of a token in
// slot order in fp32 (fp64 for fp64) inside one thread, so results are bitwise repeatable and equal the reference's
// `out += g * y` (products and sums rounded separately, no FMA contraction).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device.cuh"

namespace molm::cuda::permute {

constexpr int kRowThreads = 128;
constexpr int64_t kMaxRowBlocks = 1 << 16;

// 16 bytes of NaN in the element type T (the bit pattern repeats every element, so any aligned unit of it is NaN).
template <typename T>
uint4 nan_pattern() {
  uint4 v;
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    v.x = v.y = v.z = v.w = 0x7fc07fc0u;
  else if constexpr (std::is_same_v<T, __half>)
    v.x = v.y = v.z = v.w = 0x7e007e00u;
  else if constexpr (std::is_same_v<T, float>)
    v.x = v.y = v.z = v.w = 0x7fc00000u;
  else
    v.x = v.z = 0x00000000u, v.y = v.w = 0x7ff80000u;  // double, little endian
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

template <typename Unit, typename T>
void launch_gather_units(const T* x, int64_t x_stride0, const int64_t* index, int64_t m, int64_t group, int64_t n_rows,
                         int64_t width, T* out, stream_t stream) {
  constexpr int64_t unit_elems = int64_t(sizeof(Unit)) / int64_t(sizeof(T));
  static_assert(sizeof(Unit) <= sizeof(uint4) && sizeof(Unit) % sizeof(T) == 0);
  const uint4 pat = nan_pattern<T>();
  Unit nan_unit;
  std::memcpy(&nan_unit, &pat, sizeof(Unit));
  MOLM_CUDA_LAUNCH(gather_rows_kernel<Unit>, dim3(static_cast<unsigned>(m < kMaxRowBlocks ? m : kMaxRowBlocks)),
                   dim3(kRowThreads), size_t(0), stream, reinterpret_cast<const Unit*>(x), x_stride0 / unit_elems,
                   index, m, group, n_rows * group, width / unit_elems, nan_unit, reinterpret_cast<Unit*>(out));
}

// out [m, width] contiguous and 16-byte aligned; x [n_rows, width] with row stride x_stride0 (elements), unit
// column stride; m, width > 0.
template <typename T>
void launch_gather(const T* x, int64_t x_stride0, const int64_t* index, int64_t m, int64_t group, int64_t n_rows,
                   int64_t width, T* out, stream_t stream) {
  constexpr int64_t esize = sizeof(T);
  const bool vec = (width * esize) % 16 == 0 && (x_stride0 * esize) % 16 == 0 && aligned16(x);
  if (vec) {
    launch_gather_units<uint4>(x, x_stride0, index, m, group, n_rows, width, out, stream);
  } else if constexpr (esize == 2) {
    launch_gather_units<uint16_t>(x, x_stride0, index, m, group, n_rows, width, out, stream);
  } else if constexpr (esize == 4) {
    launch_gather_units<uint32_t>(x, x_stride0, index, m, group, n_rows, width, out, stream);
  } else {
    launch_gather_units<uint64_t>(x, x_stride0, index, m, group, n_rows, width, out, stream);
  }
}

// out[n] = sum_j gates[n, j] * y[pos[n*k + j]], j = 0..k-1 in order; gates are already in acc_t. Each thread owns
// VEC consecutive columns. An out-of-range position makes the token's row NaN.
template <typename T, int VEC>
__global__ void scatter_ksum_kernel(const T* __restrict__ y, int64_t y_stride, const dev_acc_t<T>* gates,
                                    const int64_t* __restrict__ pos, int64_t n_tokens, int64_t k, int64_t m,
                                    int64_t width, T* __restrict__ out) {
  using acc_t = dev_acc_t<T>;
  using P = dev::Pack<T, VEC>;
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
          for (int v = 0; v < VEC; ++v) acc[v] = dev::mul_add_rn(acc[v], g, dev::to_acc<acc_t>(row.v[v]));
        }
      }
      P o;
#pragma unroll
      for (int v = 0; v < VEC; ++v) o.v[v] = dev::from_acc<T>(bad ? acc_t(dev::nan_f()) : acc[v]);
      *reinterpret_cast<P*>(out + n * width + c) = o;
    }
  }
}

// y [m, width] with row stride y_stride (elements), gates [n_tokens, k] contiguous in the accumulation type,
// pos [n_tokens * k], out [n_tokens, width] contiguous and 16-byte aligned; n_tokens, width > 0.
template <typename T>
void launch_scatter_ksum(const T* y, int64_t y_stride, const dev_acc_t<T>* gates, const int64_t* pos, int64_t n_tokens,
                         int64_t k, int64_t m, int64_t width, T* out, stream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = width % kVec == 0 && y_stride % kVec == 0 && aligned16(y);
  const dim3 grid(static_cast<unsigned>(n_tokens < kMaxRowBlocks ? n_tokens : kMaxRowBlocks));
  if (vec) {
    MOLM_CUDA_LAUNCH((scatter_ksum_kernel<T, kVec>), grid, dim3(kRowThreads), size_t(0), stream, y, y_stride, gates,
                     pos, n_tokens, k, m, width, out);
  } else {
    MOLM_CUDA_LAUNCH((scatter_ksum_kernel<T, 1>), grid, dim3(kRowThreads), size_t(0), stream, y, y_stride, gates, pos,
                     n_tokens, k, m, width, out);
  }
}

}  // namespace molm::cuda::permute
