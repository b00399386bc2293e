// Stick-breaking device math and the per-row scan kernels shared by the CUDA kernels of sb_attention
// (sb_attention.cu: decode and the cuBLAS-tiled path; sb_prefill.cuh: the fused prefill and its backward).
// Compiles with nvcc and, with MOLM_CUDA_EMU, against the CPU emulator (tests/cuda_emu/cuda_emu.h).
#pragma once

#include "../cpu/core/sb_core.h"
#include "device.cuh"

// The launch macros under the names the stick-breaking headers use.
#define MOLM_SB_LAUNCH(...) MOLM_CUDA_LAUNCH(__VA_ARGS__)
#define MOLM_SB_SMEM(name) MOLM_CUDA_SMEM(name)

namespace molm::cuda::sb {

using cuda::stream_t;

constexpr int kScanWarps = 8;  // rows per CTA in the scan kernels (one warp each)

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }

using core::sb_terms;  // beta, survive, log(1 - beta) of a logit (csrc/cpu/core/sb_core.h)

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Inclusive sum over lanes >= lane (lanes = consecutive keys, higher lane = newer key).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_suffix_sum(acc_t x, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const acc_t y = __shfl_down_sync(0xffffffffu, x, off);
    if (lane + off < 32) x += y;
  }
  return x;
}

using dev::warp_prefix_sum;  // inclusive sum over lanes <= lane

// ------------------------------------------------------------------------------------------------ row scans
// Rows of a [n_bh, row_stride, width] buffer (rows 0 .. rows - 1 of each bh used), one warp each; row r of batch item
// bh is query position pos0 + r / G of batch b = bh / H. Keys are walked in 32-key groups from the query position
// down to 0; lanes hold consecutive keys.
// In place: scores -> weights A (entries beyond the query position -> 0).
template <typename acc_t>
__global__ void __launch_bounds__(kScanWarps * 32)
    sb_scan_forward_kernel(acc_t* __restrict__ w, int64_t n_rows, int rows, int64_t row_stride, int width, int G, int H,
                           int pos0, int S, const acc_t* __restrict__ bias, acc_t scale) {
  const int lane = threadIdx.x & 31;
  const int64_t r_glob = static_cast<int64_t>(blockIdx.x) * kScanWarps + (threadIdx.x >> 5);
  if (r_glob >= n_rows) return;  // whole warp leaves together
  const int64_t bh = r_glob / rows;
  const int r = static_cast<int>(r_glob % rows);
  const int i = pos0 + r / G;
  const acc_t* bb = bias ? bias + (bh / H) * S : nullptr;
  acc_t* row = w + (bh * row_stride + r) * width;
  acc_t cum = acc_t(0);
  for (int base = i - 31; base + 31 >= 0; base -= 32) {
    const int j = base + lane;
    const bool valid = j >= 0;  // j <= i always
    acc_t beta = acc_t(0), survive = acc_t(1), ls = acc_t(0);
    if (valid) sb_terms(bb ? row[j] * scale + bb[j] : row[j] * scale, beta, survive, ls);
    const acc_t incl = warp_suffix_sum(ls, lane);
    acc_t excl = __shfl_down_sync(0xffffffffu, incl, 1);
    if (lane == 31) excl = acc_t(0);
    if (valid) row[j] = beta * dev_exp(cum + excl);
    cum += __shfl_sync(0xffffffffu, incl, 0);
  }
  for (int j = i + 1 + lane; j < width; j += 32) row[j] = acc_t(0);
}

// In place: w = scores -> A, g = dA = dO . v_j -> dl (gradient of the logit). With P_j = A_j dA_j,
// dl_j = P_j (1 - beta_j) - beta_j * sum_{m<j} P_m, and sum_{m<j} P_m = sum_{m<=i} P_m - sum_{m>=j} P_m, so both
// passes walk newest to oldest: pass 1 sums P over the row, pass 2 recomputes A (bitwise the same) and writes.
template <typename acc_t>
__global__ void __launch_bounds__(kScanWarps * 32)
    sb_scan_backward_kernel(acc_t* __restrict__ w, acc_t* __restrict__ g, int64_t n_rows, int rows, int64_t row_stride,
                            int width, int G, int H, int pos0, int S, const acc_t* __restrict__ bias, acc_t scale) {
  const int lane = threadIdx.x & 31;
  const int64_t r_glob = static_cast<int64_t>(blockIdx.x) * kScanWarps + (threadIdx.x >> 5);
  if (r_glob >= n_rows) return;
  const int64_t bh = r_glob / rows;
  const int r = static_cast<int>(r_glob % rows);
  const int i = pos0 + r / G;
  const acc_t* bb = bias ? bias + (bh / H) * S : nullptr;
  acc_t* wrow = w + (bh * row_stride + r) * width;
  acc_t* grow = g + (bh * row_stride + r) * width;
  acc_t p_total = acc_t(0);
  for (int pass = 0; pass < 2; ++pass) {
    acc_t cum = acc_t(0), p_newer = acc_t(0);  // sums over keys newer than the current group
    for (int base = i - 31; base + 31 >= 0; base -= 32) {
      const int j = base + lane;
      const bool valid = j >= 0;
      acc_t beta = acc_t(0), survive = acc_t(1), ls = acc_t(0), da = acc_t(0);
      if (valid) {
        sb_terms(bb ? wrow[j] * scale + bb[j] : wrow[j] * scale, beta, survive, ls);
        da = grow[j];
      }
      const acc_t incl = warp_suffix_sum(ls, lane);
      acc_t excl = __shfl_down_sync(0xffffffffu, incl, 1);
      if (lane == 31) excl = acc_t(0);
      const acc_t a = valid ? beta * dev_exp(cum + excl) : acc_t(0);
      const acc_t p = a * da;
      cum += __shfl_sync(0xffffffffu, incl, 0);
      if (pass == 0) {
        p_total += warp_sum(p);
      } else {
        const acc_t p_suffix = warp_suffix_sum(p, lane);     // sum over keys >= j within the group
        const acc_t older = p_total - (p_newer + p_suffix);  // sum_{m<j} P_m
        if (valid) {
          wrow[j] = a;
          grow[j] = p * survive - beta * older;
        }
        p_newer += __shfl_sync(0xffffffffu, p_suffix, 0);
      }
    }
  }
  for (int j = i + 1 + lane; j < width; j += 32) wrow[j] = grow[j] = acc_t(0);
}

}  // namespace molm::cuda::sb
