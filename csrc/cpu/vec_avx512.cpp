// AVX-512 bodies of the vec.h GEMV (see vec_bodies.h):
//  * avx512: the avx2 scheme over 16 lanes (four weight rows per step, y updated in place), masked column tails.
//  * avx512_bf16: bf16 weights through _mm512_dpbf16_ps, which multiplies bf16 pairs and adds both products to an
//    fp32 lane. Pairs run along the depth: rows r and r + 1 are interleaved by unpacklo/hi (within 128-bit lanes),
//    accumulated row pair after row pair over all columns, and put back in column order once.
#include "vec_bodies.h"

#ifdef MOLM_X86
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_* placeholders (GCC PR 105593)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstring>
#include <vector>

#include "simd.h"

namespace molm::cpu::bodies {
namespace {

#define MOLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#define MOLM_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c")))

// ---------------------------------------------------------------- avx512: fp32 FMA
MOLM_AVX512 inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
MOLM_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
MOLM_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}

MOLM_AVX512 inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// rows <= 4 (ROWS is the compile-time count): four weight rows per step, 16 columns per vector.
template <int ROWS, typename w_t>
MOLM_AVX512 void gemv_f32_t(const float* x, int64_t ldx, int64_t depth, const w_t* w, int64_t ldw, float* y,
                            int64_t ldy, int64_t cols) {
  int64_t r = 0;
  for (; r + 4 <= depth; r += 4) {
    __m512 a[ROWS][4];
    for (int m = 0; m < ROWS; ++m)
      for (int u = 0; u < 4; ++u) a[m][u] = _mm512_set1_ps(x[m * ldx + r + u]);
    const w_t* w0 = w + r * ldw;
    const w_t* w1 = w0 + ldw;
    const w_t* w2 = w1 + ldw;
    const w_t* w3 = w2 + ldw;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 k = tail_mask(cols - c);
      const __m512 v0 = load16(w0 + c, k), v1 = load16(w1 + c, k), v2 = load16(w2 + c, k), v3 = load16(w3 + c, k);
      for (int m = 0; m < ROWS; ++m) {
        float* yp = y + m * ldy + c;
        __m512 acc = _mm512_maskz_loadu_ps(k, yp);
        acc = _mm512_fmadd_ps(a[m][0], v0, acc);
        acc = _mm512_fmadd_ps(a[m][1], v1, acc);
        acc = _mm512_fmadd_ps(a[m][2], v2, acc);
        acc = _mm512_fmadd_ps(a[m][3], v3, acc);
        _mm512_mask_storeu_ps(yp, k, acc);
      }
    }
  }
  for (; r < depth; ++r) {
    const w_t* wr = w + r * ldw;
    for (int m = 0; m < ROWS; ++m) {
      const __m512 a = _mm512_set1_ps(x[m * ldx + r]);
      float* ym = y + m * ldy;
      for (int64_t c = 0; c < cols; c += 16) {
        const __mmask16 k = tail_mask(cols - c);
        _mm512_mask_storeu_ps(ym + c, k, _mm512_fmadd_ps(a, load16(wr + c, k), _mm512_maskz_loadu_ps(k, ym + c)));
      }
    }
  }
}

template <typename w_t>
MOLM_AVX512 void gemv_f32(const float* x, int64_t ldx, int64_t rows, int64_t depth, const w_t* w, int64_t ldw, float* y,
                          int64_t ldy, int64_t cols) {
  for (int64_t m = 0; m < rows; m += 4) {
    const float* xm = x + m * ldx;
    float* ym = y + m * ldy;
    switch (rows - m < 4 ? rows - m : 4) {
      case 1:
        gemv_f32_t<1>(xm, ldx, depth, w, ldw, ym, ldy, cols);
        break;
      case 2:
        gemv_f32_t<2>(xm, ldx, depth, w, ldw, ym, ldy, cols);
        break;
      case 3:
        gemv_f32_t<3>(xm, ldx, depth, w, ldw, ym, ldy, cols);
        break;
      default:
        gemv_f32_t<4>(xm, ldx, depth, w, ldw, ym, ldy, cols);
        break;
    }
  }
}

// ---------------------------------------------------------------- avx512_bf16: dpbf16
inline uint16_t bf16_bits(float v) {  // round to nearest even, as c10::BFloat16
  const c10::BFloat16 b(v);
  uint16_t bits;
  std::memcpy(&bits, &b, sizeof(bits));
  return bits;
}

// Rows [lo, hi) of a column-interleaved accumulator (see gemv_dp_t) back into column order, added to y.
MOLM_AVX512_BF16 inline void add_deinterleaved(const float* acc, float* y, int64_t cols32) {
  // unpacklo holds columns 8j .. 8j+3 of 128-bit lane j, unpackhi columns 8j+4 .. 8j+7
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t c = 0; c < cols32; c += 32) {
    const __m512 lo = _mm512_loadu_ps(acc + c), hi = _mm512_loadu_ps(acc + c + 16);
    _mm512_storeu_ps(y + c, _mm512_add_ps(_mm512_loadu_ps(y + c), _mm512_permutex2var_ps(lo, first, hi)));
    _mm512_storeu_ps(y + c + 16, _mm512_add_ps(_mm512_loadu_ps(y + c + 16), _mm512_permutex2var_ps(lo, second, hi)));
  }
}

// ROWS <= 4 rows. The weight is read as it lies in memory, one pair of rows after the other over all columns (a
// column-strip walk, one 4 KB-strided row after another, starves the hardware prefetcher and halves the bandwidth
// a core reaches). Rows r and r + 1 of each 32 columns are interleaved by unpacklo/hi (within 128-bit lanes) and
// their products accumulated, pair after pair, in acc [ROWS, cols32] (L1-resident, interleaved lane order), which
// is put back in column order once. Columns past the last 32 use gemv_f32.
constexpr int64_t kPrefetchPairs = 8;

template <int ROWS>
MOLM_AVX512_BF16 void gemv_dp_t(const float* x, int64_t ldx, int64_t depth, const c10::BFloat16* w, int64_t ldw,
                                float* y, int64_t ldy, int64_t cols, const uint32_t* xpair, int64_t n_pairs,
                                float* acc) {
  const uint16_t* wb = reinterpret_cast<const uint16_t*>(w);
  const int64_t cols32 = cols / 32 * 32;
  std::fill(acc, acc + ROWS * cols32, 0.f);
  int64_t p = 0;
  // Two complete row pairs per sweep over the columns: each accumulator is loaded and stored once for both (its
  // lane takes the same dpbf16 steps in the same order, so the result is bitwise the single-pair walk's).
  for (; 2 * p + 4 <= depth; p += 2) {
    const uint16_t* w0 = wb + 2 * p * ldw;
    __m512i xa[ROWS], xb[ROWS];
    for (int m = 0; m < ROWS; ++m) {
      xa[m] = _mm512_set1_epi32(static_cast<int>(xpair[m * n_pairs + p]));
      xb[m] = _mm512_set1_epi32(static_cast<int>(xpair[m * n_pairs + p + 1]));
    }
    const uint16_t* ahead = w0 + kPrefetchPairs * 2 * ldw;
    for (int64_t c = 0; c < cols32; c += 32) {
      for (int r = 0; r < 4; ++r) _mm_prefetch(reinterpret_cast<const char*>(ahead + r * ldw + c), _MM_HINT_T0);
      const __m512i a0 = _mm512_loadu_si512(w0 + c), a1 = _mm512_loadu_si512(w0 + ldw + c);
      const __m512i b0 = _mm512_loadu_si512(w0 + 2 * ldw + c), b1 = _mm512_loadu_si512(w0 + 3 * ldw + c);
      const __m512i ila = _mm512_unpacklo_epi16(a0, a1), iha = _mm512_unpackhi_epi16(a0, a1);
      const __m512i ilb = _mm512_unpacklo_epi16(b0, b1), ihb = _mm512_unpackhi_epi16(b0, b1);
      for (int m = 0; m < ROWS; ++m) {
        float* am = acc + m * cols32 + c;
        __m512 lo = _mm512_dpbf16_ps(_mm512_loadu_ps(am), (__m512bh)ila, (__m512bh)xa[m]);
        __m512 hi = _mm512_dpbf16_ps(_mm512_loadu_ps(am + 16), (__m512bh)iha, (__m512bh)xa[m]);
        _mm512_storeu_ps(am, _mm512_dpbf16_ps(lo, (__m512bh)ilb, (__m512bh)xb[m]));
        _mm512_storeu_ps(am + 16, _mm512_dpbf16_ps(hi, (__m512bh)ihb, (__m512bh)xb[m]));
      }
    }
  }
  for (; p < n_pairs; ++p) {
    const uint16_t* w0 = wb + 2 * p * ldw;
    const uint16_t* w1 = w0 + ldw;
    const bool odd_tail = 2 * p + 1 == depth;  // the last row has no partner: pair it with zeros
    __m512i xv[ROWS];
    for (int m = 0; m < ROWS; ++m) xv[m] = _mm512_set1_epi32(static_cast<int>(xpair[m * n_pairs + p]));
    const uint16_t* ahead = w0 + kPrefetchPairs * 2 * ldw;
    for (int64_t c = 0; c < cols32; c += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + ldw + c), _MM_HINT_T0);
      const __m512i a = _mm512_loadu_si512(w0 + c);
      const __m512i b = odd_tail ? _mm512_setzero_si512() : _mm512_loadu_si512(w1 + c);
      const __m512i il = _mm512_unpacklo_epi16(a, b), ih = _mm512_unpackhi_epi16(a, b);
      for (int m = 0; m < ROWS; ++m) {
        float* am = acc + m * cols32 + c;
        _mm512_storeu_ps(am, _mm512_dpbf16_ps(_mm512_loadu_ps(am), (__m512bh)il, (__m512bh)xv[m]));
        _mm512_storeu_ps(am + 16, _mm512_dpbf16_ps(_mm512_loadu_ps(am + 16), (__m512bh)ih, (__m512bh)xv[m]));
      }
    }
  }
  for (int m = 0; m < ROWS; ++m) add_deinterleaved(acc + m * cols32, y + m * ldy, cols32);
  if (cols32 < cols) gemv_f32_t<ROWS>(x, ldx, depth, w + cols32, ldw, y + cols32, ldy, cols - cols32);
}

MOLM_AVX512_BF16 void gemv_dp(const float* x, int64_t ldx, int64_t rows, int64_t depth, const c10::BFloat16* w,
                              int64_t ldw, float* y, int64_t ldy, int64_t cols) {
  constexpr int64_t kMaxPairs = 128;  // depth handled per pass (256 rows: the expert GEMM's depth chunk)
  uint32_t xpair[4 * kMaxPairs];
  thread_local std::vector<float> acc_buffer;
  acc_buffer.resize(4 * cols);
  float* acc = acc_buffer.data();
  for (int64_t r0 = 0; r0 < depth; r0 += 2 * kMaxPairs) {
    const int64_t d = std::min<int64_t>(2 * kMaxPairs, depth - r0), n_pairs = (d + 1) / 2;
    for (int64_t m0 = 0; m0 < rows; m0 += 4) {
      const int64_t mm = std::min<int64_t>(4, rows - m0);
      const float* xm = x + m0 * ldx + r0;
      for (int64_t m = 0; m < mm; ++m)
        for (int64_t p = 0; p < n_pairs; ++p) {
          const uint32_t even = bf16_bits(xm[m * ldx + 2 * p]);
          const uint32_t odd = 2 * p + 1 < d ? bf16_bits(xm[m * ldx + 2 * p + 1]) : 0u;
          xpair[m * n_pairs + p] = even | (odd << 16);
        }
      const c10::BFloat16* wr = w + r0 * ldw;
      float* ym = y + m0 * ldy;
      switch (mm) {
        case 1:
          gemv_dp_t<1>(xm, ldx, d, wr, ldw, ym, ldy, cols, xpair, n_pairs, acc);
          break;
        case 2:
          gemv_dp_t<2>(xm, ldx, d, wr, ldw, ym, ldy, cols, xpair, n_pairs, acc);
          break;
        case 3:
          gemv_dp_t<3>(xm, ldx, d, wr, ldw, ym, ldy, cols, xpair, n_pairs, acc);
          break;
        default:
          gemv_dp_t<4>(xm, ldx, d, wr, ldw, ym, ldy, cols, xpair, n_pairs, acc);
          break;
      }
    }
  }
}

// ---------------------------------------------------------------- avx512: dot / axpy / to_float
// Four independent accumulators of 16 lanes, summed in a fixed order: bitwise repeatable.
MOLM_AVX512 float dot_f32(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), acc2);
    acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), acc3);
  }
  for (; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    acc0 = _mm512_fmadd_ps(load16(a + i, k), load16(b + i, k), acc0);
  }
  const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3));
  return simd::hsum8(_mm256_add_ps(_mm512_extractf32x8_ps(sum, 0), _mm512_extractf32x8_ps(sum, 1)));
}

MOLM_AVX512 void axpy_f32(float alpha, const float* x, float* y, int64_t n) {
  const __m512 va = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    _mm512_storeu_ps(y + i + 16, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(y + i + 16)));
  }
  for (; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, k, _mm512_fmadd_ps(va, load16(x + i, k), load16(y + i, k)));
  }
}

template <typename src_t>
MOLM_AVX512 void widen(const src_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, k, load16(src + i, k));
  }
}

#undef MOLM_AVX512
#undef MOLM_AVX512_BF16

}  // namespace

float dot_avx512(const float* a, const float* b, int64_t n) { return dot_f32(a, b, n); }
void axpy_avx512(float alpha, const float* x, float* y, int64_t n) { axpy_f32(alpha, x, y, n); }
void to_float_avx512(const c10::BFloat16* src, float* dst, int64_t n) { widen(src, dst, n); }
void to_float_avx512(const c10::Half* src, float* dst, int64_t n) { widen(src, dst, n); }

#define MOLM_DEFINE_GEMV(W_T)                                                                                     \
  void gemv_avx512(const float* x, int64_t ldx, int64_t rows, int64_t depth, const W_T* w, int64_t ldw, float* y, \
                   int64_t ldy, int64_t cols) {                                                                   \
    gemv_f32<W_T>(x, ldx, rows, depth, w, ldw, y, ldy, cols);                                                     \
  }
MOLM_DEFINE_GEMV(float)
MOLM_DEFINE_GEMV(c10::BFloat16)
MOLM_DEFINE_GEMV(c10::Half)
#undef MOLM_DEFINE_GEMV

void gemv_avx512_bf16(const float* x, int64_t ldx, int64_t rows, int64_t depth, const c10::BFloat16* w, int64_t ldw,
                      float* y, int64_t ldy, int64_t cols) {
  gemv_dp(x, ldx, rows, depth, w, ldw, y, ldy, cols);
}

}  // namespace molm::cpu::bodies
#endif
