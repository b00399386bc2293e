// Fused tensor-core prefill of stick-breaking attention (16-bit inputs): kernel traits and device code.
//
// A query row is one (position, slot) pair; the k slots of a token sit next to each other, so every key tile that
// is loaded serves all slots of BM/k positions. Per pass of query positions [t0, t0 + tn):
//   1. sb_weights_kernel: a CTA holds BM query rows in shared memory for the whole head (D <= 1024) and walks key
//      tiles from the diagonal back to key 0. Each tile's scores S = Q K^T come from WMMA over D in BD-wide chunks
//      (cp.async ring of K chunks); the epilogue scales, adds the padding bias and runs the stick-breaking scan
//      newest -> oldest with the running sum of log(1 - beta) carried per row across tiles in registers (no max or
//      rescale is needed: the carry only decreases). The weights A (16-bit) go to a [rows, width] buffer.
//      Early exit: the weights of all keys not yet walked sum to at most exp(carry) (the stick left), so once every
//      row of the CTA has carry < exit_below (-30 by default: under 1e-13 of |v|) the walk stops and the first key
//      walked is recorded for kernel 2.
//   2. sb_apply_kernel: O = A V over the walked key range of each row tile only, a plain WMMA GEMM.
// Why two kernels: with one 1024-wide head a flash-style CTA would need O[BM, 1024] in fp32 on chip (256 KB for
// BM = 64, the whole register file). Splitting D across CTAs would recompute Q K^T per slice; materialising A costs
// 2 bytes per causal pair against 4 D flops per pair, i.e. under 1 % of the work at D = 1024.
// Backward (run_backward_passes): kernel 1 without the scan gives the raw products Q K^T and dO V^T (fp32) over the
// causal key tiles, sb_scan.cuh's two-pass row scan turns them into A and dl (the logit gradient), then kernel 2
// gives dQ = scale dl K over the causal range and kernel 3 the key-side sums dK += scale dl^T Q, dV += A^T dO per key
// tile over the rows at or after it.
// No atomics: every output element is written by exactly one thread per launch, results are bitwise repeatable.
//
// The same source compiles with nvcc and, with MOLM_CUDA_EMU, with a host compiler against the CPU emulator in
// tests/cuda_emu/ (tests/test_sb_prefill_emu.py runs the kernels that way on machines without a GPU).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "sb_scan.cuh"

namespace molm::cuda::sb_prefill {

namespace wmma = nvcuda::wmma;

// ------------------------------------------------------------------------------------------------ traits
constexpr int kThreads = 256;  // 8 warps in both kernels
constexpr int kBM = 64;        // query rows per CTA (both kernels use the same row tiles)
constexpr int kBN = 64;        // keys per score tile (kernel 1)
constexpr int kStages = 3;     // cp.async ring depth
constexpr int kPad = 8;        // 16-bit elements of padding per shared-memory row (16 bytes: breaks bank conflicts)
constexpr int kMaxD = 1024;

// Kernel 1: Q tile [kBM][D + kPad] resident, K ring [kStages][kBN][BD + kPad], scores [kBM][kBN + 4] fp32, and
// one early-exit flag per warp.
template <int BD>
struct WeightsTraits {
  static constexpr int kChunk = BD;  // head dimensions per K chunk
  static constexpr int kKRow = BD + kPad;
  static constexpr int kSRow = kBN + 4;
  __host__ __device__ static int64_t q_row(int D) { return D + kPad; }
  static int64_t smem_bytes(int D) {
    return (int64_t(kBM) * q_row(D) + int64_t(kStages) * kBN * kKRow) * 2 + int64_t(kBM) * kSRow * 4 +
           kThreads / 32 * 4;
  }
};

// Kernel 2: A ring [kStages][kBM][kBK + kPad], V ring [kStages][kBK][kBNd + kPad]; the fp32 output tile
// [kBM][kBNd + 4] reuses the ring after the main loop. Kernel 3 has the same shapes with keys and rows swapped:
// X ring [kStages][kBK rows][kBN keys + kPad], Y ring [kStages][kBK rows][kBNd + kPad], output [kBN][kBNd + 4].
struct ApplyTraits {
  static constexpr int kBK = 32;    // keys per step
  static constexpr int kBNd = 128;  // output columns per CTA
  static constexpr int kARow = kBK + kPad;
  static constexpr int kVRow = kBNd + kPad;
  static constexpr int kORow = kBNd + 4;
  static constexpr int64_t kRing = (int64_t(kStages) * kBM * kARow + int64_t(kStages) * kBK * kVRow) * 2;
  static constexpr int64_t kOut = int64_t(kBM) * kORow * 4;
  static constexpr int64_t kSmem = kRing > kOut ? kRing : kOut;
  static constexpr int kXRow = kBN + kPad;
  static constexpr int64_t kKeyRing = (int64_t(kStages) * kBK * kXRow + int64_t(kStages) * kBK * kVRow) * 2;
  static constexpr int64_t kKeySmem = kKeyRing > kOut ? kKeyRing : kOut;
};

// One pass over query positions [t0, t0 + tn) of all (batch, head) pairs. Strides are in elements; the last
// dimension of q, k, v is contiguous. Row r of (b, h) is position t0 + r / G, slot r % G; rows = tn * G.
// The kernels read q as "the row operand" and k / v as "the key operands"; the backward points them at dO, V, K.
template <typename T16>
struct Params {
  const T16* q;  // [B, T, G, H, D] strided
  const T16* k;  // [B, S, H, D] strided
  const T16* v;
  const float* bias;  // [B, S] additive (fp32), or nullptr
  T16* weights;       // [B * H, row_stride, width]: A (kernels 2, 3) or dl (backward)
  float* scores;      // kernel 1 without the scan: raw products, laid out like weights
  float* key_acc;     // kernel 3: [B * H, S, D], += out_scale * weights^T q
  int* first_key;     // [B * H, row tiles]: the oldest key kernel 1 walked (a multiple of kBN); null: key 0
  T16* out;           // kernel 2: [B, T, G, H, D] contiguous, = out_scale * weights v
  int64_t qs0, qs1, qs2, qs3, ks0, ks1, ks2, vs0, vs1, vs2;
  int64_t width;       // row stride of weights: a multiple of kBN covering keys 0 .. S - T + t0 + tn - 1
  int64_t row_stride;  // rows per (b, h) in weights / scores: whole row tiles of the largest pass
  float scale;
  float exit_below;  // kernel 1 stops once every row's log-survival is below this (-inf: never)
  float out_scale;
  int B, T, G, H, D, S, t0, tn, rows;
};

// ------------------------------------------------------------------------------------------------ device helpers
template <typename T16>
__device__ __forceinline__ T16 from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}

template <typename T16>
struct alignas(4) Pair {
  T16 lo, hi;
};

// 16-byte async copy of src (when valid) or zeros into shared memory. An invalid src may point past its buffer,
// so the copy, which then reads nothing, is given `base` (a valid global address) instead.
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid, const void* base) {
  __pipeline_memcpy_async(dst, valid ? src : base, 16, valid ? 0 : 16);
}

// A warp's 32 x 32 fp32 tile of a product, as 2 x 2 WMMA fragments (kernels 2 and 3).
struct WarpTile32 {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  // acc += A B over K (a multiple of 16): A is 32 x K with element (m, k) at a[m * lda + k] (row_major) or
  // a[k * lda + m] (col_major); B is K x 32, row-major with leading dimension ldb.
  template <typename LayoutA, int K, typename T16>
  __device__ __forceinline__ void mma(const T16* a, int lda, const T16* b, int ldb) {
    constexpr bool kRowA = std::is_same_v<LayoutA, wmma::row_major>;
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T16, LayoutA> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T16, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], a + (kRowA ? i * 16 * lda + kk * 16 : kk * 16 * lda + i * 16), lda);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], b + kk * 16 * ldb + j * 16, ldb);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* dst, int ld) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(dst + i * 16 * ld + j * 16, acc[i][j], ld, wmma::mem_row_major);
  }
};

__device__ __forceinline__ int last_position(int rows_end, const int G, const int S, const int T, const int t0) {
  return S - T + t0 + (rows_end - 1) / G;  // absolute position of the CTA's newest query row
}

// ------------------------------------------------------------------------------------------------ kernel 1
// Grid (B * H, ceil(rows / kBM)), row tiles in reverse order (the longest walks first). Warp w computes scores rows
// (w % 4) * 16 .. +15, keys (w / 4) * 32 .. +31 of a tile and scans rows w * 8 .. w * 8 + 7. Without kScan the
// products go to p.scores unscaled (all key tiles up to the diagonal, rows up to the row tile's end) and there is no
// early exit.
template <typename T16, int BD, bool kScan>
__global__ void __launch_bounds__(kThreads) sb_weights_kernel(const Params<T16> p) {
  using Tr = WeightsTraits<BD>;
  MOLM_SB_SMEM(smem);
  const int D = p.D;
  const int64_t q_row = Tr::q_row(D);
  T16* qs = reinterpret_cast<T16*>(smem);                                // [kBM][q_row]
  T16* ks = qs + kBM * q_row;                                            // [kStages][kBN][kKRow]
  float* ss = reinterpret_cast<float*>(ks + kStages * kBN * Tr::kKRow);  // [kBM][kSRow]
  int* done = reinterpret_cast<int*>(ss + kBM * Tr::kSRow);              // [warps]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int tile = gridDim.y - 1 - blockIdx.y, r0 = tile * kBM;  // the longest key walks start first
  const int r_end = r0 + kBM < p.rows ? r0 + kBM : p.rows;
  const int i_max = last_position(r_end, p.G, p.S, p.T, p.t0);
  const int n_tiles = i_max / kBN + 1;  // key tiles 0 .. n_tiles - 1, walked from the newest
  const int n_chunks = D / BD;
  const int n_steps = n_tiles * n_chunks;
  const T16* kb = p.k + b * p.ks0 + h * p.ks2;

  // Q tile: rows beyond `rows` are zeros (their scores are never used).
  for (int x = tid; x < kBM * (D / 8); x += kThreads) {
    const int lr = x / (D / 8), d = (x % (D / 8)) * 8, r = r0 + lr;
    const int t = p.t0 + r / p.G, g = r % p.G;
    const T16* src = p.q + b * p.qs0 + t * p.qs1 + g * p.qs2 + h * p.qs3 + d;
    copy16(qs + lr * q_row + d, src, r < p.rows, p.q);
  }
  // K chunk of step s: keys of tile n_tiles - 1 - s / n_chunks, head dims (s % n_chunks) * BD .. + BD - 1
  auto load_chunk = [&](int s) {
    if (s < n_steps) {
      const int n0 = (n_tiles - 1 - s / n_chunks) * kBN, d0 = (s % n_chunks) * BD;
      T16* dst = ks + (s % kStages) * kBN * Tr::kKRow;
      for (int x = tid; x < kBN * (BD / 8); x += kThreads) {
        const int kr = x / (BD / 8), d = (x % (BD / 8)) * 8, j = n0 + kr;
        copy16(dst + kr * Tr::kKRow + d, kb + int64_t(j) * p.ks1 + d0 + d, j < p.S, kb);
      }
    }
    __pipeline_commit();  // always, so that the group count per step stays uniform
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) load_chunk(s);  // group 0 also carries the Q tile

  const int wr = (warp % 4) * 16, wc = (warp / 4) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  float carry[8];  // running sum of log(1 - beta) of the keys already walked, rows warp * 8 + u
#pragma unroll
  for (int u = 0; u < 8; ++u) carry[u] = 0.f;
  const float* bias_b = p.bias ? p.bias + int64_t(b) * p.S : nullptr;
  T16* wts = p.weights + int64_t(bh) * p.row_stride * p.width;
  int first_key = 0;

  for (int s = 0; s < n_steps; ++s) {
    __pipeline_wait_prior(kStages - 2);
    __syncthreads();  // chunk s visible to all warps; the slot refilled below was consumed at step s - 1
    load_chunk(s + kStages - 1);
    const int c = s % n_chunks;
    if (c == 0) {
      wmma::fill_fragment(acc[0], 0.f);
      wmma::fill_fragment(acc[1], 0.f);
    }
    const T16* kst = ks + (s % kStages) * kBN * Tr::kKRow;
#pragma unroll
    for (int kk = 0; kk < BD / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T16, wmma::row_major> a;
      wmma::load_matrix_sync(a, qs + wr * q_row + c * BD + kk * 16, q_row);
#pragma unroll
      for (int jf = 0; jf < 2; ++jf) {
        // K^T as a column-major B operand: element (d, key) sits at kst[key * kKRow + d]
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T16, wmma::col_major> bf;
        wmma::load_matrix_sync(bf, kst + (wc + jf * 16) * Tr::kKRow + kk * 16, Tr::kKRow);
        wmma::mma_sync(acc[jf], a, bf, acc[jf]);
      }
    }
    if (c != n_chunks - 1) continue;

    // ---- epilogue of key tile n0: scores -> stick-breaking weights
    const int n0 = (n_tiles - 1 - s / n_chunks) * kBN;
    if constexpr (!kScan) {
      float* dst = p.scores + (int64_t(bh) * p.row_stride + r0 + wr) * p.width + n0 + wc;
#pragma unroll
      for (int jf = 0; jf < 2; ++jf)
        wmma::store_matrix_sync(dst + jf * 16, acc[jf], static_cast<unsigned>(p.width), wmma::mem_row_major);
    } else {
#pragma unroll
      for (int jf = 0; jf < 2; ++jf)
        wmma::store_matrix_sync(ss + wr * Tr::kSRow + wc + jf * 16, acc[jf], Tr::kSRow, wmma::mem_row_major);
      __syncthreads();
      const int j_lo = n0 + 2 * lane, j_hi = j_lo + 1;  // this lane's keys (j_hi is the newer)
      const float bias_lo = bias_b && j_lo < p.S ? bias_b[j_lo] : 0.f;
      const float bias_hi = bias_b && j_hi < p.S ? bias_b[j_hi] : 0.f;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int lr = warp * 8 + u, r = r0 + lr;
        if (r >= p.rows) continue;  // uniform over the warp
        const int i = p.S - p.T + p.t0 + r / p.G;
        const float* srow = ss + lr * Tr::kSRow + 2 * lane;
        float beta_lo = 0.f, ls_lo = 0.f, beta_hi = 0.f, ls_hi = 0.f;
        float survive;
        if (j_lo <= i) sb::sb_terms(srow[0] * p.scale + bias_lo, beta_lo, survive, ls_lo);
        if (j_hi <= i) sb::sb_terms(srow[1] * p.scale + bias_hi, beta_hi, survive, ls_hi);
        const float incl = sb::warp_suffix_sum(ls_lo + ls_hi, lane);  // keys >= j_lo of this tile
        float excl = __shfl_down_sync(0xffffffffu, incl, 1);          // keys > j_hi of this tile
        if (lane == 31) excl = 0.f;
        const float newer = carry[u] + excl;
        Pair<T16> w;
        w.hi = from_float<T16>(beta_hi * expf(newer));
        w.lo = from_float<T16>(beta_lo * expf(newer + ls_hi));
        *reinterpret_cast<Pair<T16>*>(wts + int64_t(r) * p.width + j_lo) = w;
        carry[u] += __shfl_sync(0xffffffffu, incl, 0);
      }
      bool warp_done = true;  // carry is the same in every lane
#pragma unroll
      for (int u = 0; u < 8; ++u) warp_done &= r0 + warp * 8 + u >= p.rows || carry[u] < p.exit_below;
      if (lane == 0) done[warp] = warp_done;
      __syncthreads();
      // ss and done are written again only after at least one more __syncthreads at the top of the loop
      bool all_done = n0 > 0;
#pragma unroll
      for (int w = 0; w < kThreads / 32; ++w) all_done &= done[w] != 0;
      if (all_done) {  // the same decision in every thread
        first_key = n0;
        break;
      }
    }
  }
  __pipeline_wait_prior(0);
  if (kScan && tid == 0) p.first_key[int64_t(bh) * gridDim.y + tile] = first_key;
}

// ------------------------------------------------------------------------------------------------ kernel 2
// Grid (B * H, D / kBNd, ceil(rows / kBM)), row tiles in reverse order. O[rows, d0 .. d0 + kBNd) = A[rows, 0 .. keys)
// V[0 .. keys, d0 ..], keys covering the causal range of the row tile (A is zero past each row's own position). Warp
// w: rows (w % 2) * 32, columns (w / 2) * 32, 2 x 2 fragments.
template <typename T16>
__global__ void __launch_bounds__(kThreads) sb_apply_kernel(const Params<T16> p) {
  using Tr = ApplyTraits;
  MOLM_SB_SMEM(smem);
  T16* as = reinterpret_cast<T16*>(smem);      // [kStages][kBM][kARow]
  T16* vs = as + kStages * kBM * Tr::kARow;    // [kStages][kBK][kVRow]
  float* os = reinterpret_cast<float*>(smem);  // [kBM][kORow] after the main loop

  const int tid = threadIdx.x, warp = tid >> 5;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int tile = gridDim.z - 1 - blockIdx.z, r0 = tile * kBM, d0 = blockIdx.y * Tr::kBNd;
  const int r_end = r0 + kBM < p.rows ? r0 + kBM : p.rows;
  const int n_steps = last_position(r_end, p.G, p.S, p.T, p.t0) / Tr::kBK + 1;
  const int s_begin = p.first_key ? p.first_key[int64_t(bh) * gridDim.z + tile] / Tr::kBK : 0;
  const T16* wts = p.weights + int64_t(bh) * p.row_stride * p.width;
  const T16* vb = p.v + b * p.vs0 + h * p.vs2 + d0;

  auto load_step = [&](int s) {
    if (s < n_steps) {
      const int j0 = s * Tr::kBK;
      T16* ad = as + (s % kStages) * kBM * Tr::kARow;
      for (int x = tid; x < kBM * (Tr::kBK / 8); x += kThreads) {
        const int lr = x / (Tr::kBK / 8), j = (x % (Tr::kBK / 8)) * 8;
        copy16(ad + lr * Tr::kARow + j, wts + int64_t(r0 + lr) * p.width + j0 + j, r0 + lr < p.rows, wts);
      }
      T16* vd = vs + (s % kStages) * Tr::kBK * Tr::kVRow;
      for (int x = tid; x < Tr::kBK * (Tr::kBNd / 8); x += kThreads) {
        const int kr = x / (Tr::kBNd / 8), d = (x % (Tr::kBNd / 8)) * 8, j = j0 + kr;
        copy16(vd + kr * Tr::kVRow + d, vb + int64_t(j) * p.vs1 + d, j < p.S, vb);
      }
    }
    __pipeline_commit();
  };
#pragma unroll
  for (int s = s_begin; s < s_begin + kStages - 1; ++s) load_step(s);

  const int wr = (warp % 2) * 32, wc = (warp / 2) * 32;
  WarpTile32 tile_acc;
  tile_acc.zero();
  for (int s = s_begin; s < n_steps; ++s) {
    __pipeline_wait_prior(kStages - 2);
    __syncthreads();
    load_step(s + kStages - 1);
    const T16* ast = as + (s % kStages) * kBM * Tr::kARow;
    const T16* vst = vs + (s % kStages) * Tr::kBK * Tr::kVRow;
    tile_acc.mma<wmma::row_major, Tr::kBK>(ast + wr * Tr::kARow, Tr::kARow, vst + wc, Tr::kVRow);
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // every warp is done with the ring before it becomes the output tile
  tile_acc.store(os + wr * Tr::kORow + wc, Tr::kORow);
  __syncthreads();
  // 8 outputs (16 bytes) per thread and step; out is [B, T, G, H, D] contiguous
  for (int x = tid; x < kBM * (Tr::kBNd / 8); x += kThreads) {
    const int lr = x / (Tr::kBNd / 8), d = (x % (Tr::kBNd / 8)) * 8, r = r0 + lr;
    if (r >= p.rows) continue;
    const int t = p.t0 + r / p.G, g = r % p.G;
    T16* dst = p.out + (((int64_t(b) * p.T + t) * p.G + g) * p.H + h) * p.D + d0 + d;
    const float* src = os + lr * Tr::kORow + d;
    alignas(16) Pair<T16> packed[4];  // read back as one uint4
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      packed[e].lo = from_float<T16>(src[2 * e] * p.out_scale);
      packed[e].hi = from_float<T16>(src[2 * e + 1] * p.out_scale);
    }
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(packed);
  }
}

// ------------------------------------------------------------------------------------------------ kernel 3
// Grid (B * H, D / kBNd, ceil(keys / kBN)), keys = S - T + t0 + tn of the pass. key_acc[j, d0 .. d0 + kBNd) +=
// out_scale * sum over rows r of weights[r, j] q[r, d0 ..], for the kBN keys j of the tile; only rows at or after the
// tile's first key are walked (earlier rows have weights 0 there). Warp w: keys (w % 2) * 32, columns (w / 2) * 32.
template <typename T16>
__global__ void __launch_bounds__(kThreads) sb_key_grad_kernel(const Params<T16> p) {
  using Tr = ApplyTraits;
  MOLM_SB_SMEM(smem);
  T16* xs = reinterpret_cast<T16*>(smem);        // [kStages][kBK rows][kXRow]
  T16* ys = xs + kStages * Tr::kBK * Tr::kXRow;  // [kStages][kBK rows][kVRow]
  float* os = reinterpret_cast<float*>(smem);    // [kBN][kORow] after the main loop

  const int tid = threadIdx.x, warp = tid >> 5;
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int j0 = blockIdx.z * kBN, d0 = blockIdx.y * Tr::kBNd;  // the oldest keys (most rows) start first
  const int pos0 = p.S - p.T + p.t0;                            // position of row 0
  const int r_first = j0 > pos0 ? (j0 - pos0) * p.G : 0;
  const int s_begin = r_first / Tr::kBK, n_steps = (p.rows + Tr::kBK - 1) / Tr::kBK;
  const T16* xb = p.weights + int64_t(bh) * p.row_stride * p.width + j0;
  const T16* qb = p.q + b * p.qs0 + h * p.qs3 + d0;

  auto load_step = [&](int s) {
    if (s < n_steps) {
      const int ra = s * Tr::kBK;
      T16* xd = xs + (s % kStages) * Tr::kBK * Tr::kXRow;
      for (int x = tid; x < Tr::kBK * (kBN / 8); x += kThreads) {
        const int lr = x / (kBN / 8), j = (x % (kBN / 8)) * 8, r = ra + lr;
        copy16(xd + lr * Tr::kXRow + j, xb + int64_t(r) * p.width + j, r < p.rows, xb);
      }
      T16* yd = ys + (s % kStages) * Tr::kBK * Tr::kVRow;
      for (int x = tid; x < Tr::kBK * (Tr::kBNd / 8); x += kThreads) {
        const int lr = x / (Tr::kBNd / 8), d = (x % (Tr::kBNd / 8)) * 8, r = ra + lr;
        const int t = p.t0 + r / p.G, g = r % p.G;
        copy16(yd + lr * Tr::kVRow + d, qb + t * p.qs1 + g * p.qs2 + d, r < p.rows, qb);
      }
    }
    __pipeline_commit();
  };
#pragma unroll
  for (int s = s_begin; s < s_begin + kStages - 1; ++s) load_step(s);

  const int wk = (warp % 2) * 32, wc = (warp / 2) * 32;
  WarpTile32 tile_acc;
  tile_acc.zero();
  for (int s = s_begin; s < n_steps; ++s) {
    __pipeline_wait_prior(kStages - 2);
    __syncthreads();
    load_step(s + kStages - 1);
    const T16* xst = xs + (s % kStages) * Tr::kBK * Tr::kXRow;
    const T16* yst = ys + (s % kStages) * Tr::kBK * Tr::kVRow;
    // weights^T as a column-major A operand: element (key, row) sits at xst[row * kXRow + key]
    tile_acc.mma<wmma::col_major, Tr::kBK>(xst + wk, Tr::kXRow, yst + wc, Tr::kVRow);
  }
  __pipeline_wait_prior(0);
  __syncthreads();
  tile_acc.store(os + wk * Tr::kORow + wc, Tr::kORow);
  __syncthreads();
  for (int x = tid; x < kBN * (Tr::kBNd / 4); x += kThreads) {
    const int kr = x / (Tr::kBNd / 4), d = (x % (Tr::kBNd / 4)) * 4, j = j0 + kr;
    if (j >= p.S) continue;
    float4* dst = reinterpret_cast<float4*>(p.key_acc + (int64_t(bh) * p.S + j) * p.D + d0 + d);
    const float* src = os + kr * Tr::kORow + d;
    float4 a = *dst;
    a.x += p.out_scale * src[0];
    a.y += p.out_scale * src[1];
    a.z += p.out_scale * src[2];
    a.w += p.out_scale * src[3];
    *dst = a;
  }
}

// ------------------------------------------------------------------------------------------------ backward helpers
// dst[i] = src[i] rounded to 16 bits.
template <typename T16>
__global__ void sb_round_kernel(const float* __restrict__ src, T16* __restrict__ dst, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_float<T16>(src[i]);
}

// Grid (ceil(keys / 256), B): dbias[b, j] += sum over heads and rows (in order) of dl[bh, r, j] for this pass.
template <typename acc_t>
__global__ void sb_bias_grad_kernel(const acc_t* __restrict__ dl, acc_t* __restrict__ dbias, int keys, int H, int rows,
                                    int64_t row_stride, int64_t width, int S) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
  if (j >= keys) return;
  acc_t sum = acc_t(0);
  for (int h = 0; h < H; ++h) {
    const acc_t* col = dl + (int64_t(b) * H + h) * row_stride * width + j;
    for (int r = 0; r < rows; ++r) sum += col[int64_t(r) * width];
  }
  dbias[int64_t(b) * S + j] += sum;
}

// ------------------------------------------------------------------------------------------------ host side
// Which kernel-1 variant fits the device's shared memory (0 when none does: the caller takes another path).
inline int weights_chunk(int D, int64_t max_smem) {
  if (WeightsTraits<64>::smem_bytes(D) <= max_smem) return 64;
  if (WeightsTraits<32>::smem_bytes(D) <= max_smem) return 32;
  return 0;
}

// Raises kernel 1's dynamic shared-memory limit (both kScan variants of chunk bd) to what the widest head (kMaxD)
// needs, capped at the device's opt-in maximum (weights_chunk() picked bd so that the head at hand fits). A host call:
// the caller makes it once per device, outside graph capture.
template <typename T16>
cudaError_t raise_weights_smem_limit(int bd, int64_t max_optin) {
  const int64_t need = bd == 64 ? WeightsTraits<64>::smem_bytes(kMaxD) : WeightsTraits<32>::smem_bytes(kMaxD);
  const int smem = static_cast<int>(need < max_optin ? need : max_optin);
  for (auto kernel : {bd == 64 ? sb_weights_kernel<T16, 64, true> : sb_weights_kernel<T16, 32, true>,
                      bd == 64 ? sb_weights_kernel<T16, 64, false> : sb_weights_kernel<T16, 32, false>}) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Shapes the fused path takes: 16-bit, D a multiple of kBNd (so of 64 and 32) up to kMaxD.
inline bool supports(int D) { return D % ApplyTraits::kBNd == 0 && D <= kMaxD; }

// Whether the fused kernels take these inputs: p with everything but the pass fields, grad_out and its strides gs
// for the backward (else null). Beyond supports(D): every row 16-byte aligned (16-byte aligned bases, strides
// multiples of 8 elements), the (b, h) pairs within grid x and, for the backward, the key tiles within grid z and
// the batch within grid y (bias gradient).
template <typename T16>
bool takes(const Params<T16>& p, const T16* grad_out, const int64_t* gs) {
  auto rows16 = [](const void* base, std::initializer_list<int64_t> strides) {
    for (const int64_t s : strides)
      if (s % 8 != 0) return false;
    return aligned16(base);
  };
  if (!supports(p.D) || int64_t(p.B) * p.H > kMaxGridX) return false;
  if (!rows16(p.q, {p.qs0, p.qs1, p.qs2, p.qs3}) || !rows16(p.k, {p.ks0, p.ks1, p.ks2}) ||
      !rows16(p.v, {p.vs0, p.vs1, p.vs2}))
    return false;
  if (grad_out == nullptr) return true;
  return rows16(grad_out, {gs[0], gs[1], gs[2], gs[3]}) && ceil_div(p.S, kBN) <= kMaxGridYZ &&
         (p.bias == nullptr || p.B <= kMaxGridYZ);
}

inline int64_t weights_width(int S, int T, int t0, int tn) {
  const int64_t keys = int64_t(S) - T + t0 + tn;
  return (keys + kBN - 1) / kBN * kBN;
}

inline int64_t row_tiles(int64_t G, int64_t tn) { return (tn * G + kBM - 1) / kBM; }

// Elements of one [B * H, row_stride, width] buffer for passes of tn query positions.
inline int64_t weights_elements(int64_t B, int64_t H, int64_t G, int64_t S, int64_t T, int64_t tn) {
  return B * H * row_tiles(G, tn) * kBM *
         weights_width(static_cast<int>(S), static_cast<int>(T), static_cast<int>(T - tn), static_cast<int>(tn));
}

// Query positions per pass, so that the pass buffers (bytes_per_element per weights element: 2 for the forward's
// 16-bit weights, 12 for the backward's two fp32 and two 16-bit copies) stay under max_bytes.
inline int pass_positions(int64_t B, int64_t H, int64_t G, int64_t S, int64_t T, int64_t max_bytes,
                          int64_t bytes_per_element = 2) {
  const int64_t per_position = B * H * G * ((S + kBN - 1) / kBN * kBN) * bytes_per_element;
  int64_t tn = per_position > 0 ? max_bytes / per_position : T;
  if (tn >= kBM) tn = tn / kBM * kBM;
  return static_cast<int>(tn < 1 ? 1 : (tn < T ? tn : T));
}

// Sets the pass fields of p for query positions [t0, t0 + min(tn_max, T - t0)); the buffers' row stride is that of
// the largest pass (weights_elements(..., tn_max)).
template <typename T16>
void set_pass(Params<T16>& p, int t0, int tn_max) {
  p.row_stride = row_tiles(p.G, tn_max) * kBM;
  p.t0 = t0;
  p.tn = tn_max < p.T - t0 ? tn_max : p.T - t0;
  p.rows = p.tn * p.G;
  p.width = weights_width(p.S, p.T, p.t0, p.tn);
}

template <typename T16, bool kScan>
void launch_weights(const Params<T16>& p, int bd, sb::stream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B * p.H), static_cast<unsigned>(row_tiles(p.G, p.tn)));
  if (bd == 64)
    MOLM_SB_LAUNCH((sb_weights_kernel<T16, 64, kScan>), grid, dim3(kThreads),
                   static_cast<size_t>(WeightsTraits<64>::smem_bytes(p.D)), stream, p);
  else
    MOLM_SB_LAUNCH((sb_weights_kernel<T16, 32, kScan>), grid, dim3(kThreads),
                   static_cast<size_t>(WeightsTraits<32>::smem_bytes(p.D)), stream, p);
}

template <typename T16>
void launch_apply(const Params<T16>& p, sb::stream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B * p.H), static_cast<unsigned>(p.D / ApplyTraits::kBNd),
                  static_cast<unsigned>(row_tiles(p.G, p.tn)));
  MOLM_SB_LAUNCH(sb_apply_kernel<T16>, grid, dim3(kThreads), static_cast<size_t>(ApplyTraits::kSmem), stream, p);
}

// Forward: kernel 1 then kernel 2 for each pass of tn_max query positions, on `stream`. p has everything but the
// pass fields; p.weights holds weights_elements(..., tn_max), p.first_key B * H * row_tiles(G, tn_max) entries,
// out_scale = 1. bd from weights_chunk(); the caller has raised kernel 1's dynamic shared-memory limit (both kScan
// variants) to WeightsTraits<bd>::smem_bytes(D).
template <typename T16>
void run_passes(Params<T16> p, int bd, int tn_max, sb::stream_t stream) {
  for (int t0 = 0; t0 < p.T; t0 += tn_max) {
    set_pass(p, t0, tn_max);
    launch_weights<T16, true>(p, bd, stream);
    launch_apply(p, stream);
  }
}

// Buffers of the backward, each with weights_elements(..., tn_max) elements, plus the fp32 key-side accumulators
// [B * H, S, D] (zeroed by the caller) and dbias [B, S] (fp32, zeroed; null when not wanted).
template <typename T16>
struct BackwardBuffers {
  float* scores;  // Q K^T, then A (fp32)
  float* grads;   // dO V^T, then dl (fp32)
  T16* weights;   // A rounded to 16 bits
  T16* dlogits;   // dl rounded to 16 bits
  float* dk_acc;
  float* dv_acc;
  float* dbias;
};

// Backward passes. p as for run_passes (first_key unused); grad_out [B, T, G, H, D] with strides gs; dq [B, T, G,
// H, D] contiguous receives scale * dl K.
template <typename T16>
void run_backward_passes(const Params<T16>& p, const T16* grad_out, const int64_t (&gs)[4], T16* dq,
                         const BackwardBuffers<T16>& buf, int bd, int tn_max, sb::stream_t stream) {
  for (int t0 = 0; t0 < p.T; t0 += tn_max) {
    Params<T16> qk = p;  // scores = Q K^T
    set_pass(qk, t0, tn_max);
    qk.scores = buf.scores;
    launch_weights<T16, false>(qk, bd, stream);
    Params<T16> gv = qk;  // grads = dO V^T
    gv.q = grad_out, gv.qs0 = gs[0], gv.qs1 = gs[1], gv.qs2 = gs[2], gv.qs3 = gs[3];
    gv.k = p.v, gv.ks0 = p.vs0, gv.ks1 = p.vs1, gv.ks2 = p.vs2;
    gv.scores = buf.grads;
    launch_weights<T16, false>(gv, bd, stream);

    const int64_t n_rows = int64_t(p.B) * p.H * qk.rows;
    MOLM_SB_LAUNCH(sb::sb_scan_backward_kernel<float>,
                   dim3(static_cast<unsigned>((n_rows + sb::kScanWarps - 1) / sb::kScanWarps)),
                   dim3(sb::kScanWarps * 32), size_t(0), stream, buf.scores, buf.grads, n_rows, qk.rows, qk.row_stride,
                   static_cast<int>(qk.width), p.G, p.H, p.S - p.T + qk.t0, p.S, p.bias, p.scale);
    const int keys = p.S - p.T + qk.t0 + qk.tn;
    if (buf.dbias)
      MOLM_SB_LAUNCH(sb_bias_grad_kernel<float>,
                     dim3(static_cast<unsigned>((keys + 255) / 256), static_cast<unsigned>(p.B)), dim3(256), size_t(0),
                     stream, buf.grads, buf.dbias, keys, p.H, qk.rows, qk.row_stride, qk.width, p.S);
    const int64_t n = int64_t(p.B) * p.H * qk.row_stride * qk.width;
    const unsigned round_blocks = static_cast<unsigned>(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096);
    MOLM_SB_LAUNCH(sb_round_kernel<T16>, dim3(round_blocks), dim3(256), size_t(0), stream, buf.scores, buf.weights, n);
    MOLM_SB_LAUNCH(sb_round_kernel<T16>, dim3(round_blocks), dim3(256), size_t(0), stream, buf.grads, buf.dlogits, n);

    Params<T16> dqp = qk;  // dq = scale dl K over the causal range
    dqp.weights = buf.dlogits, dqp.first_key = nullptr, dqp.out = dq, dqp.out_scale = p.scale;
    dqp.v = p.k, dqp.vs0 = p.ks0, dqp.vs1 = p.ks1, dqp.vs2 = p.ks2;
    launch_apply(dqp, stream);

    const dim3 key_grid(static_cast<unsigned>(p.B * p.H), static_cast<unsigned>(p.D / ApplyTraits::kBNd),
                        static_cast<unsigned>((keys + kBN - 1) / kBN));
    Params<T16> dkp = qk;  // dk += scale dl^T Q
    dkp.weights = buf.dlogits, dkp.key_acc = buf.dk_acc, dkp.out_scale = p.scale;
    MOLM_SB_LAUNCH(sb_key_grad_kernel<T16>, key_grid, dim3(kThreads), static_cast<size_t>(ApplyTraits::kKeySmem),
                   stream, dkp);
    Params<T16> dvp = gv;  // dv += A^T dO
    dvp.weights = buf.weights, dvp.key_acc = buf.dv_acc, dvp.out_scale = 1.f;
    MOLM_SB_LAUNCH(sb_key_grad_kernel<T16>, key_grid, dim3(kThreads), static_cast<size_t>(ApplyTraits::kKeySmem),
                   stream, dvp);
  }
}

}  // namespace molm::cuda::sb_prefill
