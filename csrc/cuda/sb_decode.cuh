// Split-KV decode of stick-breaking attention (T <= kDecodeMaxQueries query positions per sequence): kernels and
// launch plan, free of ATen so that the CPU emulator (tests/cuda_emu/) runs them in tests/test_sb_decode_emu.py.
// One CTA per (query position, key chunk) reads each key row of its chunk once for all k slots of the token, scores
// it, runs the newest-to-oldest scan over the chunk (warp scan, carry = running log-survival) and accumulates A @ V;
// a second kernel combines the chunks newest to oldest, o = o_0 + exp(s_0) * (o_1 + exp(s_1) * (...)). No host
// synchronisation: capturable in a CUDA graph.
#pragma once

#include <cstdint>
#include <type_traits>

#include "sb_scan.cuh"

namespace molm::cuda::sb_decode {

using namespace sb;

constexpr int kDecodeMaxQueries = 4;  // T <= this takes the split-KV path
constexpr int kDecodeThreads = 256;
constexpr int kMaxSlotsPerPass = 4;  // k slots held in registers at once (more slots loop in groups)

// Element types as the kernels see them: __nv_bfloat16, __half, float, double.
using dev::from_acc;
using dev::to_acc;

// The kVec = 16 / sizeof(scalar_t) elements of one 16-byte load as acc_t, by bit operations (no local-memory copy).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void unpack16(const uint4& r, acc_t (&out)[16 / sizeof(scalar_t)]) {
  const unsigned w[4] = {r.x, r.y, r.z, r.w};
  if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);  // element 2i: the low half (little endian)
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else if constexpr (std::is_same_v<scalar_t, __half>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  } else if constexpr (std::is_same_v<scalar_t, float>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(w[i]);
  } else {
    out[0] = __hiloint2double(static_cast<int>(w[1]), static_cast<int>(w[0]));
    out[1] = __hiloint2double(static_cast<int>(w[3]), static_cast<int>(w[2]));
  }
}

// ------------------------------------------------------------------------------------------------ decode (split-KV)
// Grid (B * T * H, n_chunks). Chunk c of query position i covers keys [max(0, hi - chunk), hi), hi = i + 1 - c*chunk.
// Writes o_part[((row * G + g) * n_chunks + c) * D + d] and s_part[(row * G + g) * n_chunks + c] (fp32/fp64).
// Shared memory: q as acc_t [G, D], then the chunk's logits -> weights as acc_t [G, chunk].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDecodeThreads, 2)
    sb_decode_chunk_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                           const scalar_t* __restrict__ v, const acc_t* __restrict__ bias, acc_t scale, int T, int G,
                           int H, int D, int S, int chunk, int n_chunks, int64_t qs0, int64_t qs1, int64_t qs2,
                           int64_t qs3, int64_t ks0, int64_t ks1, int64_t ks2, int64_t vs0, int64_t vs1, int64_t vs2,
                           bool vec_ok, acc_t* __restrict__ o_part, acc_t* __restrict__ s_part) {
  MOLM_SB_SMEM(smem_raw);
  acc_t* qsm = reinterpret_cast<acc_t*>(smem_raw);  // [G, D]
  acc_t* wsm = qsm + static_cast<int64_t>(G) * D;   // [G, chunk]
  const int64_t row = blockIdx.x;
  const int c = blockIdx.y;
  const int b = static_cast<int>(row / (static_cast<int64_t>(T) * H));
  const int t = static_cast<int>((row / H) % T);
  const int h = static_cast<int>(row % H);
  const int i = S - T + t;  // absolute query position
  const int k_hi = i + 1 - c * chunk;
  const int k_lo = k_hi - chunk > 0 ? k_hi - chunk : 0;
  const int n = k_hi > k_lo ? k_hi - k_lo : 0;  // keys in this chunk; key jj = 0 .. n-1 is position k_hi - 1 - jj
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;
  constexpr int kVec = 16 / sizeof(scalar_t);

  // 16-bit inputs on the vector path: q is stored as two planes per slot, plane p holding elements 4p .. 4p+3 of every
  // 8-element vector (q_plane(g, p)[dv * 4 + e] = q[g, dv * 8 + 4p + e]), so a warp's float4 reads are conflict-free.
  constexpr bool kPlanes = kVec == 8;
  for (int x = tid; x < G * D; x += blockDim.x) {
    const int g = x / D, d = x % D;
    const int slot = (kPlanes && vec_ok) ? g * D + ((d % 8) / 4) * (D / 2) + (d / 8) * 4 + d % 4 : x;
    qsm[slot] = to_acc<acc_t>(q[b * qs0 + t * qs1 + g * qs2 + h * qs3 + d]);
  }
  __syncthreads();

  // 1. logits: one warp per key row (coalesced over D), all slots at once
  for (int jj = warp; jj < n; jj += n_warps) {
    const int j = k_hi - 1 - jj;
    const scalar_t* krow = k + b * ks0 + static_cast<int64_t>(j) * ks1 + h * ks2;
    const acc_t bj = bias ? bias[static_cast<int64_t>(b) * S + j] : acc_t(0);
    for (int g0 = 0; g0 < G; g0 += kMaxSlotsPerPass) {
      acc_t part[kMaxSlotsPerPass];
#pragma unroll
      for (int u = 0; u < kMaxSlotsPerPass; ++u) part[u] = acc_t(0);
      if (vec_ok) {  // 16-byte loads, kVec elements each
        for (int dv = lane; dv < D / kVec; dv += 32) {
          acc_t kx[kVec];
          unpack16<scalar_t, acc_t>(*reinterpret_cast<const uint4*>(krow + dv * kVec), kx);
          if constexpr (kPlanes) {
#pragma unroll
            for (int u = 0; u < kMaxSlotsPerPass; ++u) {
              if (g0 + u < G) {
                const acc_t* qg = qsm + (g0 + u) * D + dv * 4;
                const float4 lo = *reinterpret_cast<const float4*>(qg);          // elements 0..3 of the vector
                const float4 hi = *reinterpret_cast<const float4*>(qg + D / 2);  // elements 4..7
                part[u] += lo.x * kx[0] + lo.y * kx[1] + lo.z * kx[2] + lo.w * kx[3] + hi.x * kx[4] + hi.y * kx[5] +
                           hi.z * kx[6] + hi.w * kx[7];
              }
            }
          } else {
#pragma unroll
            for (int x = 0; x < kVec; ++x) {
#pragma unroll
              for (int u = 0; u < kMaxSlotsPerPass; ++u)
                if (g0 + u < G) part[u] += qsm[(g0 + u) * D + dv * kVec + x] * kx[x];
            }
          }
        }
      } else {
        for (int d = lane; d < D; d += 32) {
          const acc_t kv = to_acc<acc_t>(krow[d]);
#pragma unroll
          for (int u = 0; u < kMaxSlotsPerPass; ++u)
            if (g0 + u < G) part[u] += qsm[(g0 + u) * D + d] * kv;
        }
      }
#pragma unroll
      for (int u = 0; u < kMaxSlotsPerPass; ++u) {
        const acc_t s = warp_sum(part[u]);
        if (lane == 0 && g0 + u < G) wsm[(g0 + u) * chunk + jj] = s * scale + bj;
      }
    }
  }
  __syncthreads();

  // 2. scan per slot, newest (jj = 0) to oldest: A = beta * exp(sum of log-survival of newer keys in the chunk)
  for (int g = warp; g < G; g += n_warps) {
    acc_t cum = acc_t(0);
    for (int base = 0; base < n; base += 32) {
      const int jj = base + lane;
      const bool valid = jj < n;
      acc_t beta = acc_t(0), survive = acc_t(1), ls = acc_t(0);
      if (valid) sb_terms(wsm[g * chunk + jj], beta, survive, ls);
      const acc_t incl = warp_prefix_sum(ls, lane);
      acc_t excl = __shfl_up_sync(0xffffffffu, incl, 1);
      if (lane == 0) excl = acc_t(0);
      if (valid) wsm[g * chunk + jj] = beta * dev_exp(cum + excl);
      cum += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) s_part[(row * G + g) * n_chunks + c] = cum;
  }
  __syncthreads();

  // 3. o = sum_jj A[g, jj] v_j, one thread per kVec output columns (16-byte loads) or per column, slots in groups.
  // On the vector path, when D / kVec columns would leave half the block idle, the upper half of the threads takes
  // the older half of the chunk's keys and leaves its sums in qsm (q is no longer needed); they are added to the lower
  // half's after a barrier, in that fixed order.
  if (vec_ok) {
    const int n_vec = D / kVec;
    const int split = 2 * n_vec <= static_cast<int>(blockDim.x) ? 2 : 1;
    const int jj_mid = split == 2 ? (n + 1) / 2 : n;
    for (int t = tid; t < split * n_vec; t += blockDim.x) {
      const int dv = t % n_vec;
      const bool upper = t >= n_vec;
      const int jj_begin = upper ? jj_mid : 0, jj_end = upper ? n : jj_mid;
      for (int g0 = 0; g0 < G; g0 += kMaxSlotsPerPass) {
        acc_t acc[kMaxSlotsPerPass][kVec];
#pragma unroll
        for (int u = 0; u < kMaxSlotsPerPass; ++u)
#pragma unroll
          for (int x = 0; x < kVec; ++x) acc[u][x] = acc_t(0);
        for (int jj = jj_begin; jj < jj_end; ++jj) {
          const int j = k_hi - 1 - jj;
          acc_t vx[kVec];
          unpack16<scalar_t, acc_t>(
              *reinterpret_cast<const uint4*>(v + b * vs0 + static_cast<int64_t>(j) * vs1 + h * vs2 + dv * kVec), vx);
#pragma unroll
          for (int u = 0; u < kMaxSlotsPerPass; ++u) {
            if (g0 + u < G) {
              const acc_t a = wsm[(g0 + u) * chunk + jj];
#pragma unroll
              for (int x = 0; x < kVec; ++x) acc[u][x] += a * vx[x];
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kMaxSlotsPerPass; ++u)
          if (g0 + u < G) {
            acc_t* o =
                upper ? qsm + (g0 + u) * D + dv * kVec : o_part + ((row * G + g0 + u) * n_chunks + c) * D + dv * kVec;
#pragma unroll
            for (int x = 0; x < kVec; ++x) o[x] = acc[u][x];
          }
      }
    }
    if (split == 2) {
      __syncthreads();  // the older keys' sums are in qsm; o_part's rows are visible to the whole block
      for (int x = tid; x < G * D; x += blockDim.x) o_part[((row * G + x / D) * n_chunks + c) * D + x % D] += qsm[x];
    }
    return;
  }
  for (int d = tid; d < D; d += blockDim.x) {
    for (int g0 = 0; g0 < G; g0 += kMaxSlotsPerPass) {
      acc_t acc[kMaxSlotsPerPass];
#pragma unroll
      for (int u = 0; u < kMaxSlotsPerPass; ++u) acc[u] = acc_t(0);
      for (int jj = 0; jj < n; ++jj) {
        const int j = k_hi - 1 - jj;
        const acc_t vv = to_acc<acc_t>(v[b * vs0 + static_cast<int64_t>(j) * vs1 + h * vs2 + d]);
#pragma unroll
        for (int u = 0; u < kMaxSlotsPerPass; ++u)
          if (g0 + u < G) acc[u] += wsm[(g0 + u) * chunk + jj] * vv;
      }
#pragma unroll
      for (int u = 0; u < kMaxSlotsPerPass; ++u)
        if (g0 + u < G) o_part[((row * G + g0 + u) * n_chunks + c) * D + d] = acc[u];
    }
  }
}

// Grid (B * T * H * G). out[b, t, g, h, :] = combine of the chunks, newest first.
template <typename scalar_t, typename acc_t>
__global__ void sb_decode_combine_kernel(const acc_t* __restrict__ o_part, const acc_t* __restrict__ s_part, int T,
                                         int G, int H, int D, int n_chunks, scalar_t* __restrict__ out) {
  const int64_t rg = blockIdx.x;  // (row, g), row = (b * T + t) * H + h
  const int64_t row = rg / G;
  const int g = static_cast<int>(rg % G);
  const int64_t bt = row / H;  // b * T + t
  const int h = static_cast<int>(row % H);
  scalar_t* o = out + ((bt * G + g) * H + h) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t acc = acc_t(0), carried = acc_t(0);
    for (int c = 0; c < n_chunks; ++c) {
      acc += dev_exp(carried) * o_part[(rg * n_chunks + c) * D + d];
      carried += s_part[rg * n_chunks + c];
    }
    o[d] = from_acc<scalar_t>(acc);
  }
}

// ------------------------------------------------------------------------------------------------ host side
struct DecodePlan {
  int64_t chunk, n_chunks;  // keys per CTA (a multiple of 32, 64 .. 512) and CTAs per query row
  int64_t smem;             // dynamic shared memory of the chunk kernel (bytes)
};

// Enough CTAs to fill the chip (about 4 per SM) with chunks of 64 .. 512 keys.
inline DecodePlan plan(int64_t n_rows, int64_t G, int64_t D, int64_t S, int64_t sms, int64_t acc_size) {
  const int64_t want_chunks = ceil_div(4 * sms, n_rows) > 1 ? ceil_div(4 * sms, n_rows) : 1;
  int64_t chunk = ceil_div(ceil_div(S, want_chunks), 32) * 32;
  chunk = chunk < 64 ? 64 : (chunk > 512 ? 512 : chunk);
  return {chunk, ceil_div(S, chunk), (G * D + G * chunk) * acc_size};
}

// Arguments of both kernels; strides in elements, q [B, T, G, H, D], k / v [B, S, H, D], out [B, T, G, H, D]
// contiguous. vec_ok: 16-byte loads of K / V rows (every row start 16-byte aligned, D a multiple of the vector).
template <typename scalar_t, typename acc_t>
struct DecodeArgs {
  const scalar_t *q, *k, *v;
  const acc_t* bias;  // [B, S] or nullptr
  acc_t scale;
  int B, T, G, H, D, S;
  int64_t qs0, qs1, qs2, qs3, ks0, ks1, ks2, vs0, vs1, vs2;
  bool vec_ok;    // vec_loads_ok()
  acc_t* o_part;  // [B * T * H * G * n_chunks, D]
  acc_t* s_part;  // [B * T * H * G * n_chunks]
  scalar_t* out;
};

// 16-byte loads of K / V rows (DecodeArgs::vec_ok): D a multiple of the vector and every row start 16-byte aligned
// (16-byte aligned bases, strides multiples of the vector; the last dimension is contiguous).
template <typename scalar_t, typename acc_t>
bool vec_loads_ok(const DecodeArgs<scalar_t, acc_t>& a) {
  constexpr int64_t kVec = 16 / sizeof(scalar_t);
  return a.D % kVec == 0 && aligned16(a.k) && aligned16(a.v) && a.ks0 % kVec == 0 && a.ks1 % kVec == 0 &&
         a.ks2 % kVec == 0 && a.vs0 % kVec == 0 && a.vs1 % kVec == 0 && a.vs2 % kVec == 0;
}

// Raises the chunk kernel's dynamic shared-memory limit to pl.smem when that exceeds the default 48 KiB (the caller
// has checked pl.smem against the device's opt-in maximum). A host call, before launch().
template <typename scalar_t, typename acc_t>
cudaError_t raise_smem_limit(const DecodePlan& pl) {
  if (pl.smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(sb_decode_chunk_kernel<scalar_t, acc_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(pl.smem));
}

// After raise_smem_limit(pl).
template <typename scalar_t, typename acc_t>
void launch(const DecodeArgs<scalar_t, acc_t>& a, const DecodePlan& pl, stream_t stream) {
  const int64_t n_rows = int64_t(a.B) * a.T * a.H;
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(pl.n_chunks));  // n_chunks <= S / 64
  MOLM_SB_LAUNCH((sb_decode_chunk_kernel<scalar_t, acc_t>), grid, dim3(kDecodeThreads), static_cast<size_t>(pl.smem),
                 stream, a.q, a.k, a.v, a.bias, a.scale, a.T, a.G, a.H, a.D, a.S, static_cast<int>(pl.chunk),
                 static_cast<int>(pl.n_chunks), a.qs0, a.qs1, a.qs2, a.qs3, a.ks0, a.ks1, a.ks2, a.vs0, a.vs1, a.vs2,
                 a.vec_ok, a.o_part, a.s_part);
  MOLM_SB_LAUNCH((sb_decode_combine_kernel<scalar_t, acc_t>), dim3(static_cast<unsigned>(n_rows * a.G)), dim3(256),
                 size_t(0), stream, a.o_part, a.s_part, a.T, a.G, a.H, a.D, static_cast<int>(pl.n_chunks), a.out);
}

}  // namespace molm::cuda::sb_decode
