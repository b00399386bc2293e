// Grouped expert GEMM over contiguous expert segments (forward) and its weight gradient: kernels and launch
// decisions, free of ATen so that the CPU emulator (tests/cuda_emu/) runs them in tests/test_expert_gemm_emu.py.
// The segment bounds are read on the device (no host sync, graph-capturable). Three paths:
//   * decode GEMV (M <= kGemvMaxM rows in all, fp32/bf16/fp16, weight [.., Nout] contiguous): each block streams
//     a (depth chunk x 512-column) slab of one expert's weight once, in 16-byte loads, for up to 8 rows at a
//     time; fp32 partial sums per depth chunk are added in a fixed order by a second kernel (+ activation).
//   * tensor cores (bf16/fp16): WMMA 16x16x16, fp32 accumulation, 128x128x32 block tiles, 8 warps.
//   * SIMT (fp32/fp64): 64x64x16 block tiles, 4x4 outputs per thread, fp32 (fp64) FMA accumulation.
// Each output element is produced by one thread in a fixed order: bitwise repeatable, no atomics. Row tiles of
// all experts are numbered consecutively; a block finds its expert by walking the offsets (E is small).
// wgrad: grad_weight[e] = x[rows of e]^T @ grad_out[rows of e], the same tile code with the segment as the
// reduction dimension (an empty expert reduces over nothing and writes zeros).
// Element types as the kernels see them: __nv_bfloat16, __half, float, double.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device.cuh"

namespace molm::cuda::expert_gemm {

using dev::clamp64;

// C[m, n] = act(A[m, kdim] @ B[kdim, n]) for one expert, any strides (one of each pair is usually 1).
template <typename T>
struct Problem {
  const T* a;
  int64_t a_rs, a_cs;
  const T* b;
  int64_t b_rs, b_cs;
  T* c;
  int64_t ldc, m, n, kdim;
  bool vec;  // a and b row-major, 16-byte aligned rows, kdim and n multiples of 8: 16-byte tile loads (WMMA only)
};

constexpr int kThreads = 256;

// ------------------------------------------------------------------------------------------------ SIMT tile
constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16;

// Shared memory: As [BK][BM + 1], Bs [BK][BN + 1] in acc_t.
template <typename T>
constexpr int kSimtSmem = (kSimtBK * (kSimtBM + 1) + kSimtBK * (kSimtBN + 1)) * int(sizeof(dev_acc_t<T>));

template <typename T>
__device__ void simt_tile(const Problem<T>& p, int64_t row0, int64_t col0, bool gelu, unsigned char* smem) {
  using acc_t = dev_acc_t<T>;
  auto* As = reinterpret_cast<acc_t(*)[kSimtBM + 1]>(smem);                                            // [BK][BM + 1]
  auto* Bs = reinterpret_cast<acc_t(*)[kSimtBN + 1]>(smem + kSimtBK * (kSimtBM + 1) * sizeof(acc_t));  // [BK][BN + 1]
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;  // thread owns rows ty + 16i, cols tx + 16j
  acc_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  for (int64_t k0 = 0; k0 < p.kdim; k0 += kSimtBK) {
    for (int idx = tid; idx < kSimtBM * kSimtBK; idx += kThreads) {
      // consecutive threads walk the unit-stride dimension of A (coalesced)
      const int r = p.a_cs == 1 ? idx / kSimtBK : idx % kSimtBM;
      const int kk = p.a_cs == 1 ? idx % kSimtBK : idx / kSimtBM;
      const int64_t gr = row0 + r, gk = k0 + kk;
      As[kk][r] = (gr < p.m && gk < p.kdim) ? static_cast<acc_t>(p.a[gr * p.a_rs + gk * p.a_cs]) : acc_t(0);
    }
    for (int idx = tid; idx < kSimtBK * kSimtBN; idx += kThreads) {
      const int kk = p.b_cs == 1 ? idx / kSimtBN : idx % kSimtBK;
      const int c = p.b_cs == 1 ? idx % kSimtBN : idx / kSimtBK;
      const int64_t gk = k0 + kk, gc = col0 + c;
      Bs[kk][c] = (gk < p.kdim && gc < p.n) ? static_cast<acc_t>(p.b[gk * p.b_rs + gc * p.b_cs]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      acc_t a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gr = row0 + ty + 16 * i, gc = col0 + tx + 16 * j;
      if (gr < p.m && gc < p.n) p.c[gr * p.ldc + gc] = static_cast<T>(gelu ? dev::gelu_new(acc[i][j]) : acc[i][j]);
    }
}

// ------------------------------------------------------------------------------------------------ WMMA tile
constexpr int kWmmaBM = 128, kWmmaBN = 128, kWmmaBK = 32;
constexpr int kLdA = kWmmaBK + 8, kLdB = kWmmaBN + 8, kLdC = 16 + 4;  // padded leading dims (multiples of 8 / 4)
// Shared memory: As [BM][ldA] and Bs [BK][ldB] in the 16-bit type, then one fp32 16 x ldC staging tile per warp
// (each part a multiple of 128 bytes, so every part starts 128-byte aligned).
constexpr int kWmmaSmemA = kWmmaBM * kLdA * 2, kWmmaSmemB = kWmmaBK * kLdB * 2, kWmmaSmemC = 8 * 16 * kLdC * 4;
constexpr int kWmmaSmem = kWmmaSmemA + kWmmaSmemB + kWmmaSmemC;
static_assert(kWmmaSmemA % 128 == 0 && kWmmaSmemB % 128 == 0, "WMMA tiles need 32-byte aligned fragments");

// 8 warps as 4 (rows) x 2 (cols); each warp owns a 32 x 64 sub-tile = 2 x 4 fragments of 16 x 16.
template <typename T>
__device__ void wmma_tile(const Problem<T>& p, int64_t row0, int64_t col0, bool gelu, unsigned char* smem) {
#if defined(MOLM_CUDA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  using namespace nvcuda;
  T* As = reinterpret_cast<T*>(smem);                                    // [BM][BK] row-major
  T* Bs = reinterpret_cast<T*>(smem + kWmmaSmemA);                       // [BK][BN] row-major
  float* Cs = reinterpret_cast<float*>(smem + kWmmaSmemA + kWmmaSmemB);  // [8][16 * ldC]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wr = warp / 2, wc = warp % 2;
  const T zero = dev::from_acc<T>(0.f);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t k0 = 0; k0 < p.kdim; k0 += kWmmaBK) {
    if (p.vec) {  // 8 elements per load; with kdim, n multiples of 8 a vector is wholly inside or outside
      constexpr int kAV = kWmmaBK / 8, kBV = kWmmaBN / 8;  // vectors per tile row
      for (int idx = tid; idx < kWmmaBM * kAV; idx += kThreads) {
        const int r = idx / kAV, kv = (idx % kAV) * 8;
        const int64_t gr = row0 + r, gk = k0 + kv;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);  // zero bits == +0.0 in bf16 and fp16
        if (gr < p.m && gk < p.kdim) v = *reinterpret_cast<const uint4*>(p.a + gr * p.a_rs + gk);
        *reinterpret_cast<uint4*>(As + r * kLdA + kv) = v;
      }
      for (int idx = tid; idx < kWmmaBK * kBV; idx += kThreads) {
        const int kk = idx / kBV, cv = (idx % kBV) * 8;
        const int64_t gk = k0 + kk, gc = col0 + cv;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (gk < p.kdim && gc < p.n) v = *reinterpret_cast<const uint4*>(p.b + gk * p.b_rs + gc);
        *reinterpret_cast<uint4*>(Bs + kk * kLdB + cv) = v;
      }
    } else {
      for (int idx = tid; idx < kWmmaBM * kWmmaBK; idx += kThreads) {
        const int r = p.a_cs == 1 ? idx / kWmmaBK : idx % kWmmaBM;
        const int kk = p.a_cs == 1 ? idx % kWmmaBK : idx / kWmmaBM;
        const int64_t gr = row0 + r, gk = k0 + kk;
        As[r * kLdA + kk] = (gr < p.m && gk < p.kdim) ? p.a[gr * p.a_rs + gk * p.a_cs] : zero;
      }
      for (int idx = tid; idx < kWmmaBK * kWmmaBN; idx += kThreads) {
        const int kk = p.b_cs == 1 ? idx / kWmmaBN : idx % kWmmaBK;
        const int c = p.b_cs == 1 ? idx % kWmmaBN : idx / kWmmaBK;
        const int64_t gk = k0 + kk, gc = col0 + c;
        Bs[kk * kLdB + c] = (gk < p.kdim && gc < p.n) ? p.b[gk * p.b_rs + gc * p.b_cs] : zero;
      }
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kWmmaBK / 16; ++ks) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[4];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wr * 32 + 16 * i) * kLdA + ks * 16, kLdA);
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(fb[j], Bs + ks * 16 * kLdB + wc * 64 + 16 * j, kLdB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* cs = Cs + warp * 16 * kLdC;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      wmma::store_matrix_sync(cs, acc[i][j], kLdC, wmma::mem_row_major);
      __syncwarp();
      for (int el = lane; el < 256; el += 32) {
        const int r = el / 16, c = el % 16;
        const int64_t gr = row0 + wr * 32 + 16 * i + r, gc = col0 + wc * 64 + 16 * j + c;
        if (gr < p.m && gc < p.n) {
          const float v = cs[r * kLdC + c];
          p.c[gr * p.ldc + gc] = dev::from_acc<T>(gelu ? dev::gelu_new(v) : v);
        }
      }
      __syncwarp();
    }
#else
  __trap();  // built for an arch without bf16 tensor cores: the host never launches this there (sm_80+ only)
#endif
}

template <typename T>
constexpr bool kUseWmma = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;
template <typename T>
constexpr int kTileM = kUseWmma<T> ? kWmmaBM : kSimtBM;
template <typename T>
constexpr int kTileN = kUseWmma<T> ? kWmmaBN : kSimtBN;
template <typename T>
constexpr int kTileSmem = kUseWmma<T> ? kWmmaSmem : kSimtSmem<T>;  // dynamic shared memory of a tile block (bytes)

template <typename T>
__device__ __forceinline__ void tile(const Problem<T>& p, int64_t row0, int64_t col0, bool gelu, unsigned char* smem) {
  if constexpr (kUseWmma<T>) {
    wmma_tile<T>(p, row0, col0, gelu, smem);
  } else {
    simt_tile<T>(p, row0, col0, gelu, smem);
  }
}

// grid: x = column tiles, y walks the row tiles of all experts (n_row_slots >= their total).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    expert_gemm_kernel(const T* __restrict__ x, int64_t xs0, const T* __restrict__ w, int64_t ws0, int64_t ws1,
                       int64_t ws2, const int64_t* __restrict__ offsets, int64_t n_experts, int64_t m, int64_t kdim,
                       int64_t n_out, int64_t n_row_slots, bool gelu, bool vec, T* __restrict__ out) {
  MOLM_CUDA_SMEM(smem);
  constexpr int BM = kTileM<T>;
  const int64_t col0 = int64_t(blockIdx.x) * kTileN<T>;
  for (int64_t t = blockIdx.y; t < n_row_slots; t += gridDim.y) {
    int64_t e = -1, lo = 0, rows = 0, row0 = 0, rem = t;
    for (int64_t ee = 0; ee < n_experts; ++ee) {
      const int64_t a = clamp64(offsets[ee], 0, m), b = clamp64(offsets[ee + 1], a, m);
      const int64_t tiles = (b - a + BM - 1) / BM;
      if (rem < tiles) {
        e = ee, lo = a, rows = b - a, row0 = rem * BM;
        break;
      }
      rem -= tiles;
    }
    if (e < 0) break;  // past the last row tile (the same for every thread of the block)
    const Problem<T> p{x + lo * xs0, xs0, 1, w + e * ws0, ws1, ws2, out + lo * n_out, n_out, rows, n_out, kdim, vec};
    tile<T>(p, row0, col0, gelu, smem);
  }
}

// grid: x = column tiles of Nout, y = row tiles of K, z = expert.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    expert_wgrad_kernel(const T* __restrict__ x, int64_t xs0, int64_t xs1, const T* __restrict__ g, int64_t gs0,
                        int64_t gs1, const int64_t* __restrict__ offsets, int64_t m, int64_t kdim, int64_t n_out,
                        T* __restrict__ gw) {
  MOLM_CUDA_SMEM(smem);
  const int64_t e = blockIdx.z;
  const int64_t a = clamp64(offsets[e], 0, m), b = clamp64(offsets[e + 1], a, m);
  // A = x[a:b]^T [kdim, rows], B = g[a:b] [rows, n_out]
  const Problem<T> p{x + a * xs0,           xs1,   xs0,  g + a * gs0, gs0,   gs1,
                     gw + e * kdim * n_out, n_out, kdim, n_out,       b - a, false};
  tile<T>(p, int64_t(blockIdx.y) * kTileM<T>, int64_t(blockIdx.x) * kTileN<T>, false, smem);
}

// ------------------------------------------------------------------------------------------------ decode GEMV
constexpr int kGemvThreads = 64, kGemvRows = 8;
constexpr int64_t kGemvDepth = 64;  // weight rows per block (fixed: the result does not depend on the device)
constexpr int64_t kGemvMaxM = 32;   // total rows up to which the GEMV path is taken

// partial[split, r, c] = sum over the split's depth rows of x[r, kk] * w[e, kk, c], r in expert e's segment.
template <typename T, int VEC>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_partial_kernel(const T* __restrict__ x, int64_t xs0, const T* __restrict__ w, int64_t ws0, int64_t ws1,
                        const int64_t* __restrict__ offsets, int64_t m, int64_t kdim, int64_t n_out,
                        float* __restrict__ partial) {
  using P = dev::Pack<T, VEC>;
  const int64_t e = blockIdx.z, split = blockIdx.y;
  const int64_t c0 = (int64_t(blockIdx.x) * kGemvThreads + threadIdx.x) * VEC;
  const int64_t lo = clamp64(offsets[e], 0, m), hi = clamp64(offsets[e + 1], lo, m);
  if (c0 >= n_out || lo == hi) return;
  const int64_t k0 = split * kGemvDepth, k1 = k0 + kGemvDepth < kdim ? k0 + kGemvDepth : kdim;
  const T* wp = w + e * ws0 + c0;
  for (int64_t r0 = lo; r0 < hi; r0 += kGemvRows) {
    const int64_t rows = hi - r0 < kGemvRows ? hi - r0 : kGemvRows;
    float acc[kGemvRows][VEC];
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[r][v] = 0.f;
#pragma unroll 4
    for (int64_t kk = k0; kk < k1; ++kk) {
      const P wv = *reinterpret_cast<const P*>(wp + kk * ws1);
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
        if (r < rows) {
          const float xv = dev::to_acc<float>(x[(r0 + r) * xs0 + kk]);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[r][v] = fmaf(xv, dev::to_acc<float>(wv.v[v]), acc[r][v]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
      if (r < rows)
#pragma unroll
        for (int v = 0; v < VEC; ++v) partial[(split * m + r0 + r) * n_out + c0 + v] = acc[r][v];
  }
}

// out[i] = act(sum_{split = 0..S-1} partial[split, i]) in that order.
template <typename T>
__global__ void gemv_reduce_kernel(const float* __restrict__ partial, int64_t n_splits, int64_t total, bool gelu,
                                   T* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t sp = 0; sp < n_splits; ++sp) s += partial[sp * total + i];
    out[i] = dev::from_acc<T>(gelu ? dev::gelu_new(s) : s);
  }
}

// ------------------------------------------------------------------------------------------------ host side

// Operands of the forward paths: x [m, kdim] (row stride xs0, unit column stride), weight [E, kdim, n_out] (strides
// ws0, ws1, ws2), offsets [E + 1], out [m, n_out] contiguous; m, n_out, kdim > 0.
template <typename T>
struct GemmArgs {
  const T* x;
  int64_t xs0;
  const T* w;
  int64_t ws0, ws1, ws2;
  const int64_t* offsets;
  int64_t n_experts, m, kdim, n_out;
  bool gelu;
  T* out;
};

// fp32/bf16/fp16 with few rows and a unit-stride weight row take the GEMV; else the tile kernels (or, on sm_90, the
// CUTLASS grouped GEMM, which the caller picks).
template <typename T>
bool use_gemv(const GemmArgs<T>& a) {
  return !std::is_same_v<T, double> && a.m <= kGemvMaxM && a.ws2 == 1;
}

// fp32 partial sums of the GEMV: [n_splits, m, n_out].
inline int64_t gemv_workspace_elems(int64_t m, int64_t kdim, int64_t n_out) {
  return ceil_div(kdim, kGemvDepth) * m * n_out;
}

template <typename T>
void launch_gemv(const GemmArgs<T>& a, float* partial, stream_t stream) {
  const int64_t n_splits = ceil_div(a.kdim, kGemvDepth);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.n_out % kVec == 0 && a.ws1 % kVec == 0 && a.ws0 % kVec == 0 && aligned16(a.w);
  auto run = [&](auto vec_tag) {
    constexpr int V = decltype(vec_tag)::value;
    const dim3 grid(static_cast<unsigned>(ceil_div(a.n_out, int64_t(kGemvThreads) * V)),
                    static_cast<unsigned>(n_splits), static_cast<unsigned>(a.n_experts));
    MOLM_CUDA_LAUNCH((gemv_partial_kernel<T, V>), grid, dim3(kGemvThreads), size_t(0), stream, a.x, a.xs0, a.w, a.ws0,
                     a.ws1, a.offsets, a.m, a.kdim, a.n_out, partial);
  };
  if (vec) {
    run(std::integral_constant<int, kVec>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
  const int64_t total = a.m * a.n_out;
  const int64_t blocks = ceil_div(total, 256) < 4096 ? ceil_div(total, 256) : 4096;
  MOLM_CUDA_LAUNCH(gemv_reduce_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(256), size_t(0), stream,
                   static_cast<const float*>(partial), n_splits, total, a.gelu, a.out);
}

template <typename T>
void launch_tiles(const GemmArgs<T>& a, stream_t stream) {
  const int64_t n_row_slots = ceil_div(a.m, kTileM<T>) + a.n_experts;  // >= sum_e ceil(M_e / BM)
  const bool vec = kUseWmma<T> && a.kdim % 8 == 0 && a.n_out % 8 == 0 && a.xs0 % 8 == 0 && a.ws2 == 1 &&
                   a.ws1 % 8 == 0 && a.ws0 % 8 == 0 && aligned16(a.x) && aligned16(a.w);
  const dim3 grid(static_cast<unsigned>(ceil_div(a.n_out, kTileN<T>)),
                  static_cast<unsigned>(n_row_slots < kMaxGridYZ ? n_row_slots : kMaxGridYZ));
  MOLM_CUDA_LAUNCH(expert_gemm_kernel<T>, grid, dim3(kThreads), size_t(kTileSmem<T>), stream, a.x, a.xs0, a.w, a.ws0,
                   a.ws1, a.ws2, a.offsets, a.n_experts, a.m, a.kdim, a.n_out, n_row_slots, a.gelu, vec, a.out);
}

// grad_w [E, kdim, n_out] contiguous = x[rows of e]^T @ g[rows of e]; x [m, kdim] and g [m, n_out] any strides;
// ceil(kdim / kTileM) <= 65535 (the caller checks).
template <typename T>
void launch_wgrad(const T* x, int64_t xs0, int64_t xs1, const T* g, int64_t gs0, int64_t gs1, const int64_t* offsets,
                  int64_t n_experts, int64_t m, int64_t kdim, int64_t n_out, T* grad_w, stream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(n_out, kTileN<T>)), static_cast<unsigned>(ceil_div(kdim, kTileM<T>)),
                  static_cast<unsigned>(n_experts));
  MOLM_CUDA_LAUNCH(expert_wgrad_kernel<T>, grid, dim3(kThreads), size_t(kTileSmem<T>), stream, x, xs0, xs1, g, gs0, gs1,
                   offsets, m, kdim, n_out, grad_w);
}

}  // namespace molm::cuda::expert_gemm
