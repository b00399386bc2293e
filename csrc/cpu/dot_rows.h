// Dot products of input rows with contiguous weight rows, the core of molm::linear and the int8 ops:
//   y[m * ldy + r] = sum_k x[m * K + k] * w[r * ldw + k]   for m < M, r < R,
// four weight rows at a time with fp32 accumulators in registers. w_t: float, bf16, fp16 (read as stored) or int8
// (widened to fp32). Scalar, AVX2, AVX-512 and (bf16 weights with bf16 inputs) AVX-512-BF16 bodies; the caller picks
// the instruction set once per call. Each output is summed in a fixed order: results do not depend on threads.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"
#include "vec.h"

namespace molm::cpu {

// Software prefetch of the four weight rows kPrefetchRows rows ahead at depth k, once per 64-byte line: a core's
// demand misses alone use a fraction of the memory bandwidth (int8 lm_head [50295, 1024], one AMD EPYC core:
// 16 GB/s without, 40-48 GB/s with).
constexpr int64_t kPrefetchRows = 32;

template <typename w_t>
inline void prefetch_rows_ahead(const w_t* const* wr, int64_t ldw, int64_t k) {
  if ((k * static_cast<int64_t>(sizeof(w_t))) % 64 != 0) return;
  for (int r = 0; r < 4; ++r) __builtin_prefetch(wr[r] + kPrefetchRows * ldw + k, 0, 3);
}

// R <= 4 per call of the scalar, AVX2 and AVX-512 bodies.
template <typename w_t>
inline void dot_rows_scalar(const float* x, int64_t M, int64_t K, const w_t* w, int64_t ldw, int64_t R, float* y,
                            int64_t ldy) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < R; ++r) {
      const float* xm = x + m * K;
      const w_t* wr = w + r * ldw;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      int64_t k = 0;
      for (; k + 4 <= K; k += 4)
        for (int u = 0; u < 4; ++u) acc[u] += xm[k + u] * static_cast<float>(wr[k + u]);
      float s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      for (; k < K; ++k) s += xm[k] * static_cast<float>(wr[k]);
      y[m * ldy + r] = s;
    }
}

#ifdef MOLM_X86

template <typename w_t>
MOLM_TARGET_AVX2 void dot_rows_avx2(const float* x, int64_t M, int64_t K, const w_t* w, int64_t ldw, int64_t R,
                                    float* y, int64_t ldy) {
  if (R < 4) return dot_rows_scalar(x, M, K, w, ldw, R, y, ldy);
  const w_t* const wr[4] = {w, w + ldw, w + 2 * ldw, w + 3 * ldw};
  const w_t *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3];
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      if (m == 0) prefetch_rows_ahead(wr, ldw, k);
      const __m256 xv = _mm256_loadu_ps(xm + k);
      a0 = _mm256_fmadd_ps(xv, simd::load8(w0 + k), a0);
      a1 = _mm256_fmadd_ps(xv, simd::load8(w1 + k), a1);
      a2 = _mm256_fmadd_ps(xv, simd::load8(w2 + k), a2);
      a3 = _mm256_fmadd_ps(xv, simd::load8(w3 + k), a3);
    }
    float s[4] = {simd::hsum8(a0), simd::hsum8(a1), simd::hsum8(a2), simd::hsum8(a3)};
    for (; k < K; ++k) {
      s[0] += xm[k] * static_cast<float>(w0[k]);
      s[1] += xm[k] * static_cast<float>(w1[k]);
      s[2] += xm[k] * static_cast<float>(w2[k]);
      s[3] += xm[k] * static_cast<float>(w3[k]);
    }
    for (int r = 0; r < 4; ++r) y[m * ldy + r] = s[r];
  }
}

// ---------------------------------------------------------------- AVX-512F
// int8 rows: 32 depth positions per step with two accumulators per row, so eight widen-convert-FMA chains are in
// flight (four, one per row, left the FMA pipes waiting on their latency).
MOLM_TARGET_AVX512 inline void dot_rows_avx512_q8(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t ldw,
                                                  float* y, int64_t ldy) {
  const int8_t* const wr[4] = {w, w + ldw, w + 2 * ldw, w + 3 * ldw};
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m512 lo[4], hi[4];
    for (int r = 0; r < 4; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      if (m == 0) prefetch_rows_ahead(wr, ldw, k);
      const __m512 x0 = _mm512_loadu_ps(xm + k), x1 = _mm512_loadu_ps(xm + k + 16);
      for (int r = 0; r < 4; ++r) {
        lo[r] = _mm512_fmadd_ps(x0, simd::load16(wr[r] + k), lo[r]);
        hi[r] = _mm512_fmadd_ps(x1, simd::load16(wr[r] + k + 16), hi[r]);
      }
    }
    for (; k + 16 <= K; k += 16) {
      const __m512 x0 = _mm512_loadu_ps(xm + k);
      for (int r = 0; r < 4; ++r) lo[r] = _mm512_fmadd_ps(x0, simd::load16(wr[r] + k), lo[r]);
    }
    float s[4];
    for (int r = 0; r < 4; ++r) s[r] = _mm512_reduce_add_ps(_mm512_add_ps(lo[r], hi[r]));
    for (; k < K; ++k)
      for (int r = 0; r < 4; ++r) s[r] += xm[k] * static_cast<float>(wr[r][k]);
    for (int r = 0; r < 4; ++r) y[m * ldy + r] = s[r];
  }
}

template <typename w_t>
MOLM_TARGET_AVX512 void dot_rows_avx512(const float* x, int64_t M, int64_t K, const w_t* w, int64_t ldw, int64_t R,
                                        float* y, int64_t ldy) {
  if (R < 4) return dot_rows_scalar(x, M, K, w, ldw, R, y, ldy);
  if constexpr (std::is_same_v<w_t, int8_t>) return dot_rows_avx512_q8(x, M, K, w, ldw, y, ldy);
  const w_t* const wr[4] = {w, w + ldw, w + 2 * ldw, w + 3 * ldw};
  const w_t *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3];
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      if (m == 0) prefetch_rows_ahead(wr, ldw, k);
      const __m512 xv = _mm512_loadu_ps(xm + k);
      a0 = _mm512_fmadd_ps(xv, simd::load16(w0 + k), a0);
      a1 = _mm512_fmadd_ps(xv, simd::load16(w1 + k), a1);
      a2 = _mm512_fmadd_ps(xv, simd::load16(w2 + k), a2);
      a3 = _mm512_fmadd_ps(xv, simd::load16(w3 + k), a3);
    }
    float s[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                  _mm512_reduce_add_ps(a3)};
    for (; k < K; ++k) {
      s[0] += xm[k] * static_cast<float>(w0[k]);
      s[1] += xm[k] * static_cast<float>(w1[k]);
      s[2] += xm[k] * static_cast<float>(w2[k]);
      s[3] += xm[k] * static_cast<float>(w3[k]);
    }
    for (int r = 0; r < 4; ++r) y[m * ldy + r] = s[r];
  }
}

// ---------------------------------------------------------------- AVX-512-BF16: bf16 pairs, fp32 accumulation
MOLM_TARGET_AVX512BF16 inline __m512bh load32(const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }

// x is bf16 here (the op's input dtype), so no rounding happens that the other bodies avoid.
MOLM_TARGET_AVX512BF16 inline void dot_rows_avx512_bf16(const c10::BFloat16* x, int64_t M, int64_t K,
                                                        const c10::BFloat16* w, int64_t ldw, int64_t R, float* y,
                                                        int64_t ldy) {
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const int64_t rr = std::min<int64_t>(4, R - r0);
    const c10::BFloat16* wr[4];
    for (int r = 0; r < 4; ++r) wr[r] = w + (r0 + std::min<int64_t>(r, rr - 1)) * ldw;  // clamp: reads stay valid
    for (int64_t m = 0; m < M; ++m) {
      const c10::BFloat16* xm = x + m * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
        if (m == 0) prefetch_rows_ahead(wr, ldw, k);
        const __m512bh xv = load32(xm + k);
        a0 = _mm512_dpbf16_ps(a0, xv, load32(wr[0] + k));
        a1 = _mm512_dpbf16_ps(a1, xv, load32(wr[1] + k));
        a2 = _mm512_dpbf16_ps(a2, xv, load32(wr[2] + k));
        a3 = _mm512_dpbf16_ps(a3, xv, load32(wr[3] + k));
      }
      float s[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                    _mm512_reduce_add_ps(a3)};
      for (; k < K; ++k) {
        const float xk = static_cast<float>(xm[k]);
        for (int r = 0; r < 4; ++r) s[r] += xk * static_cast<float>(wr[r][k]);
      }
      for (int r = 0; r < rr; ++r) y[m * ldy + r0 + r] = s[r];
    }
  }
}

#endif

// All outputs of weight rows [r0, r0 + R) for the M input rows, with the bodies of instruction set `isa`.
template <typename w_t>
inline void dot_rows(Isa isa, const float* x, const w_t* x16, int64_t M, int64_t K, const w_t* w, int64_t ldw,
                     int64_t R, float* y, int64_t ldy) {
#ifdef MOLM_X86
  if constexpr (std::is_same_v<w_t, c10::BFloat16>) {
    if (isa == Isa::kAvx512Bf16) return dot_rows_avx512_bf16(x16, M, K, w, ldw, R, y, ldy);
  }
  const bool wide = isa == Isa::kAvx512 || isa == Isa::kAvx512Bf16;
  for (int64_t r = 0; r < R; r += 4) {
    const int64_t rr = std::min<int64_t>(4, R - r);
    if (wide)
      dot_rows_avx512(x, M, K, w + r * ldw, ldw, rr, y + r, ldy);
    else if (isa == Isa::kAvx2)
      dot_rows_avx2(x, M, K, w + r * ldw, ldw, rr, y + r, ldy);
    else
      dot_rows_scalar(x, M, K, w + r * ldw, ldw, rr, y + r, ldy);
  }
#else
  (void)isa;
  (void)x16;
  dot_rows_scalar(x, M, K, w, ldw, R, y, ldy);
#endif
}

}  // namespace molm::cpu
