// CUDA grouped expert GEMM over contiguous expert segments (forward) and its weight gradient, with the segment
// bounds read on the device (no host sync, graph-capturable). Three paths:
//   * decode GEMV (M <= kGemvMaxM rows in all, fp32/bf16/fp16, weight [.., Nout] contiguous): each block streams
//     a (depth chunk x 512-column) slab of one expert's weight once, in 16-byte loads, for up to 8 rows at a
//     time; fp32 partial sums per depth chunk are added in a fixed order by a second kernel (+ activation).
//   * tensor cores (bf16/fp16): WMMA 16x16x16, fp32 accumulation, 128x128x32 block tiles, 8 warps.
//   * SIMT (fp32/fp64): 64x64x16 block tiles, 4x4 outputs per thread, fp32 (fp64) FMA accumulation.
// Each output element is produced by one thread in a fixed order: bitwise repeatable, no atomics. Row tiles of
// all experts are numbered consecutively; a block finds its expert by walking the offsets (E is small).
// wgrad: grad_weight[e] = x[rows of e]^T @ grad_out[rows of e], the same tile code with the segment as the
// reduction dimension (an empty expert reduces over nothing and writes zeros).
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <type_traits>

#include "../checks.h"
#include "../dispatch.h"
#include "common.cuh"
#include "expert_gemm_sm90.h"

namespace molm::cuda {
namespace {

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

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// ------------------------------------------------------------------------------------------------ SIMT tile
constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kThreads = 256;

template <typename T>
__device__ void simt_tile(const Problem<T>& p, int64_t row0, int64_t col0, bool gelu) {
  using acc_t = acc_type<T>;
  __shared__ acc_t As[kSimtBK][kSimtBM + 1];
  __shared__ acc_t Bs[kSimtBK][kSimtBN + 1];
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

template <typename T>
struct WmmaType;
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// 8 warps as 4 (rows) x 2 (cols); each warp owns a 32 x 64 sub-tile = 2 x 4 fragments of 16 x 16.
template <typename T>
__device__ void wmma_tile(const Problem<T>& p, int64_t row0, int64_t col0, bool gelu) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using W = typename WmmaType<T>::type;
  __shared__ __align__(128) T As[kWmmaBM * kLdA];   // [BM][BK] row-major
  __shared__ __align__(128) T Bs[kWmmaBK * kLdB];   // [BK][BN] row-major
  __shared__ __align__(128) float Cs[8][16 * kLdC];  // one 16x16 staging tile per warp
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wr = warp / 2, wc = warp % 2;
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
        As[r * kLdA + kk] = (gr < p.m && gk < p.kdim) ? p.a[gr * p.a_rs + gk * p.a_cs] : T(0.f);
      }
      for (int idx = tid; idx < kWmmaBK * kWmmaBN; idx += kThreads) {
        const int kk = p.b_cs == 1 ? idx / kWmmaBN : idx % kWmmaBK;
        const int c = p.b_cs == 1 ? idx % kWmmaBN : idx / kWmmaBK;
        const int64_t gk = k0 + kk, gc = col0 + c;
        Bs[kk * kLdB + c] = (gk < p.kdim && gc < p.n) ? p.b[gk * p.b_rs + gc * p.b_cs] : T(0.f);
      }
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kWmmaBK / 16; ++ks) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> fb[4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const W*>(As) + (wr * 32 + 16 * i) * kLdA + ks * 16, kLdA);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wmma::load_matrix_sync(fb[j], reinterpret_cast<const W*>(Bs) + ks * 16 * kLdB + wc * 64 + 16 * j, kLdB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
  float* cs = Cs[warp];
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
          p.c[gr * p.ldc + gc] = static_cast<T>(gelu ? dev::gelu_new(v) : v);
        }
      }
      __syncwarp();
    }
#else
  __trap();  // built for an arch without bf16 tensor cores: the host never launches this there (sm_80+ only)
#endif
}

template <typename T>
constexpr bool kUseWmma = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
template <typename T>
constexpr int kTileM = kUseWmma<T> ? kWmmaBM : kSimtBM;
template <typename T>
constexpr int kTileN = kUseWmma<T> ? kWmmaBN : kSimtBN;

template <typename T>
__device__ __forceinline__ void tile(const Problem<T>& p, int64_t row0, int64_t col0, bool gelu) {
  if constexpr (kUseWmma<T>) {
    wmma_tile<T>(p, row0, col0, gelu);
  } else {
    simt_tile<T>(p, row0, col0, gelu);
  }
}

// grid: x = column tiles, y walks the row tiles of all experts (n_row_slots >= their total).
template <typename T>
__global__ void __launch_bounds__(kThreads) expert_gemm_kernel(const T* __restrict__ x, int64_t xs0,
                                                               const T* __restrict__ w, int64_t ws0, int64_t ws1,
                                                               int64_t ws2, const int64_t* __restrict__ offsets,
                                                               int64_t n_experts, int64_t m, int64_t kdim,
                                                               int64_t n_out, int64_t n_row_slots, bool gelu,
                                                               bool vec, T* __restrict__ out) {
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
    tile<T>(p, row0, col0, gelu);
  }
}

// grid: x = column tiles of Nout, y = row tiles of K, z = expert.
template <typename T>
__global__ void __launch_bounds__(kThreads) expert_wgrad_kernel(const T* __restrict__ x, int64_t xs0, int64_t xs1,
                                                                const T* __restrict__ g, int64_t gs0, int64_t gs1,
                                                                const int64_t* __restrict__ offsets, int64_t m,
                                                                int64_t kdim, int64_t n_out, T* __restrict__ gw) {
  const int64_t e = blockIdx.z;
  const int64_t a = clamp64(offsets[e], 0, m), b = clamp64(offsets[e + 1], a, m);
  // A = x[a:b]^T [kdim, rows], B = g[a:b] [rows, n_out]
  const Problem<T> p{x + a * xs0, xs1, xs0, g + a * gs0, gs0, gs1, gw + e * kdim * n_out, n_out, kdim, n_out, b - a,
                     false};
  tile<T>(p, int64_t(blockIdx.y) * kTileM<T>, int64_t(blockIdx.x) * kTileN<T>, false);
}

// ------------------------------------------------------------------------------------------------ decode GEMV
constexpr int kGemvThreads = 64, kGemvRows = 8;
constexpr int64_t kGemvDepth = 64;  // weight rows per block (fixed: the result does not depend on the device)
constexpr int64_t kGemvMaxM = 32;   // total rows up to which the GEMV path is taken

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// partial[split, r, c] = sum over the split's depth rows of x[r, kk] * w[e, kk, c], r in expert e's segment.
template <typename T, int VEC>
__global__ void __launch_bounds__(kGemvThreads) gemv_partial_kernel(const T* __restrict__ x, int64_t xs0,
                                                                    const T* __restrict__ w, int64_t ws0, int64_t ws1,
                                                                    const int64_t* __restrict__ offsets, int64_t m,
                                                                    int64_t kdim, int64_t n_out,
                                                                    float* __restrict__ partial) {
  using P = Pack<T, VEC>;
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
          const float xv = static_cast<float>(x[(r0 + r) * xs0 + kk]);
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[r][v] = fmaf(xv, static_cast<float>(wv.v[v]), acc[r][v]);
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
    out[i] = static_cast<T>(gelu ? dev::gelu_new(s) : s);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
void launch_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& offsets, bool gelu, at::Tensor& out) {
  const int64_t m = x.size(0), kdim = x.size(1), n_experts = weight.size(0), n_out = weight.size(2);
  const int64_t n_splits = ceil_div(kdim, kGemvDepth);
  at::Tensor partial = at::empty({n_splits, m, n_out}, x.options().dtype(at::kFloat));  // [S, M, Nout]
  const auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = n_out % kVec == 0 && weight.stride(1) % kVec == 0 && weight.stride(0) % kVec == 0 &&
                   aligned16(weight.data_ptr());
  auto run = [&](auto vec_tag) {
    constexpr int V = decltype(vec_tag)::value;
    const dim3 grid(static_cast<unsigned>(ceil_div(n_out, int64_t(kGemvThreads) * V)),
                    static_cast<unsigned>(n_splits), static_cast<unsigned>(n_experts));
    gemv_partial_kernel<T, V><<<grid, kGemvThreads, 0, stream>>>(
        x.data_ptr<T>(), x.stride(0), weight.data_ptr<T>(), weight.stride(0), weight.stride(1),
        offsets.data_ptr<int64_t>(), m, kdim, n_out, partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (vec) {
    run(std::integral_constant<int, kVec>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
  const int64_t total = m * n_out;
  gemv_reduce_kernel<T><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(total, 256), 4096)), 256, 0, stream>>>(
      partial.data_ptr<float>(), n_splits, total, gelu, out.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// CUTLASS sm_90a grouped GEMM (expert_gemm_sm90.cu) on compute capability 9.0 from this many rows on (below, the
// WMMA tiles' lower launch overhead wins). set_kernel_options(sm90_gemm="off") turns it off, "on" takes it for any M
// above the GEMV range (tests).
constexpr int64_t kSm90MinM = 256;

bool use_sm90_gemm(const at::Tensor& x, int64_t m) {
  const int choice = kernel_options().sm90_gemm.load(std::memory_order_relaxed);
  if (choice < 0) return false;
  const bool forced = choice > 0;
  // sm_90a code runs on compute capability 9.0 only
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(x.get_device());
  return (forced || m >= kSm90MinM) && prop->major == 9 && prop->minor == 0;
}

bool tensor_cores_ok(const at::Tensor& t) {
  return at::cuda::getDeviceProperties(t.get_device())->major >= 8;
}

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
    using T = scalar_t;
    if constexpr (kUseWmma<T>)
      TORCH_CHECK_VALUE(tensor_cores_ok(x), "molm::expert_gemm: 16-bit inputs need a GPU of compute capability "
                        ">= 8.0 (bf16/fp16 tensor cores)");
    if constexpr (!std::is_same_v<T, double>) {
      if (m <= kGemvMaxM && weight.stride(2) == 1) {
        launch_gemv<T>(x, weight, expert_offsets, gelu, out);
        return;
      }
    }
    if constexpr (kUseWmma<T>) {
      if (use_sm90_gemm(x, m) && expert_gemm_sm90(x, weight, expert_offsets, gelu, out)) return;
    }
    const int64_t n_row_slots = ceil_div(m, kTileM<T>) + n_experts;  // >= sum_e ceil(M_e / BM)
    const bool vec = kUseWmma<T> && kdim % 8 == 0 && n_out % 8 == 0 && x.stride(0) % 8 == 0 &&
                     weight.stride(2) == 1 && weight.stride(1) % 8 == 0 && weight.stride(0) % 8 == 0 &&
                     aligned16(x.data_ptr()) && aligned16(weight.data_ptr());
    const dim3 grid(static_cast<unsigned>(ceil_div(n_out, kTileN<T>)),
                    static_cast<unsigned>(std::min(n_row_slots, kMaxGridYZ)));
    expert_gemm_kernel<T><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<T>(), x.stride(0), weight.data_ptr<T>(), weight.stride(0), weight.stride(1), weight.stride(2),
        expert_offsets.data_ptr<int64_t>(), n_experts, m, kdim, n_out, n_row_slots, gelu, vec, out.data_ptr<T>());
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
  TORCH_CHECK_VALUE(num_experts <= kMaxGridYZ, "molm::expert_gemm_wgrad: the CUDA kernel supports up to ",
                    kMaxGridYZ, " experts, got ", num_experts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  MOLM_DISPATCH_FLOATING(x.scalar_type(), "molm::expert_gemm_wgrad", [&] {
    using T = scalar_t;
    if constexpr (kUseWmma<T>)
      TORCH_CHECK_VALUE(tensor_cores_ok(x), "molm::expert_gemm_wgrad: 16-bit inputs need a GPU of compute "
                        "capability >= 8.0 (bf16/fp16 tensor cores)");
    const int64_t row_tiles = ceil_div(kdim, kTileM<T>);
    TORCH_CHECK_VALUE(row_tiles <= kMaxGridYZ, "molm::expert_gemm_wgrad: x.size(1) = ", kdim, " is too large");
    const dim3 grid(static_cast<unsigned>(ceil_div(n_out, kTileN<T>)), static_cast<unsigned>(row_tiles),
                    static_cast<unsigned>(num_experts));
    expert_wgrad_kernel<T><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<T>(), x.stride(0), x.stride(1), grad_out.data_ptr<T>(), grad_out.stride(0), grad_out.stride(1),
        expert_offsets.data_ptr<int64_t>(), m, kdim, n_out, grad_w.data_ptr<T>());
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
