// AVX2 + FMA + F16C bodies of the vec.h micro-kernels (see vec_bodies.h).
#include "simd.h"
#include "vec_bodies.h"

#ifdef MOLM_X86
#include <immintrin.h>

namespace molm::cpu::bodies {
namespace {

#define MOLM_AVX2 __attribute__((target("avx2,fma,f16c")))

using simd::load8;

MOLM_AVX2 float dot_body(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = simd::hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

MOLM_AVX2 void axpy_body(float alpha, const float* x, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8)));
  }
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

MOLM_AVX2 void bf16_to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

MOLM_AVX2 void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// rows <= 4 (ROWS is the compile-time count): four weight rows per step, 8 columns per vector.
template <int ROWS, typename w_t>
MOLM_AVX2 void gemv_rows_avx2_t(const float* x, int64_t ldx, int64_t depth, const w_t* w, int64_t ldw, float* y,
                                int64_t ldy, int64_t cols) {
  int64_t r = 0;
  for (; r + 4 <= depth; r += 4) {
    __m256 a[ROWS][4];
    float as[ROWS][4];
    for (int m = 0; m < ROWS; ++m)
      for (int u = 0; u < 4; ++u) {
        as[m][u] = x[m * ldx + r + u];
        a[m][u] = _mm256_set1_ps(as[m][u]);
      }
    const w_t* w0 = w + r * ldw;
    const w_t* w1 = w0 + ldw;
    const w_t* w2 = w1 + ldw;
    const w_t* w3 = w2 + ldw;
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      const __m256 v0 = load8(w0 + c), v1 = load8(w1 + c), v2 = load8(w2 + c), v3 = load8(w3 + c);
      for (int m = 0; m < ROWS; ++m) {
        float* yp = y + m * ldy + c;
        __m256 acc = _mm256_loadu_ps(yp);
        acc = _mm256_fmadd_ps(a[m][0], v0, acc);
        acc = _mm256_fmadd_ps(a[m][1], v1, acc);
        acc = _mm256_fmadd_ps(a[m][2], v2, acc);
        acc = _mm256_fmadd_ps(a[m][3], v3, acc);
        _mm256_storeu_ps(yp, acc);
      }
    }
    for (; c < cols; ++c)
      for (int m = 0; m < ROWS; ++m)
        y[m * ldy + c] += as[m][0] * static_cast<float>(w0[c]) + as[m][1] * static_cast<float>(w1[c]) +
                          as[m][2] * static_cast<float>(w2[c]) + as[m][3] * static_cast<float>(w3[c]);
  }
  for (; r < depth; ++r) {
    const w_t* wr = w + r * ldw;
    for (int m = 0; m < ROWS; ++m) {
      const float am = x[m * ldx + r];
      const __m256 a = _mm256_set1_ps(am);
      float* ym = y + m * ldy;
      int64_t c = 0;
      for (; c + 8 <= cols; c += 8)
        _mm256_storeu_ps(ym + c, _mm256_fmadd_ps(a, load8(wr + c), _mm256_loadu_ps(ym + c)));
      for (; c < cols; ++c) ym[c] += am * static_cast<float>(wr[c]);
    }
  }
}

template <typename w_t>
MOLM_AVX2 void gemv_rows_avx2(const float* x, int64_t ldx, int64_t rows, int64_t depth, const w_t* w, int64_t ldw,
                              float* y, int64_t ldy, int64_t cols) {
  switch (rows) {
    case 1:
      return gemv_rows_avx2_t<1>(x, ldx, depth, w, ldw, y, ldy, cols);
    case 2:
      return gemv_rows_avx2_t<2>(x, ldx, depth, w, ldw, y, ldy, cols);
    case 3:
      return gemv_rows_avx2_t<3>(x, ldx, depth, w, ldw, y, ldy, cols);
    case 4:
      return gemv_rows_avx2_t<4>(x, ldx, depth, w, ldw, y, ldy, cols);
    default:
      for (int64_t m = 0; m < rows; m += 4) {
        const int64_t mm = rows - m < 4 ? rows - m : 4;
        gemv_rows_avx2(x + m * ldx, ldx, mm, depth, w, ldw, y + m * ldy, ldy, cols);
      }
  }
}

}  // namespace

float dot_avx2(const float* a, const float* b, int64_t n) { return dot_body(a, b, n); }
void axpy_avx2(float alpha, const float* x, float* y, int64_t n) { axpy_body(alpha, x, y, n); }
void to_float_avx2(const c10::BFloat16* src, float* dst, int64_t n) { bf16_to_float(src, dst, n); }
void to_float_avx2(const c10::Half* src, float* dst, int64_t n) { half_to_float(src, dst, n); }

#define MOLM_DEFINE_GEMV(W_T)                                                                                   \
  void gemv_avx2(const float* x, int64_t ldx, int64_t rows, int64_t depth, const W_T* w, int64_t ldw, float* y, \
                 int64_t ldy, int64_t cols) {                                                                   \
    gemv_rows_avx2<W_T>(x, ldx, rows, depth, w, ldw, y, ldy, cols);                                             \
  }
MOLM_DEFINE_GEMV(float)
MOLM_DEFINE_GEMV(c10::BFloat16)
MOLM_DEFINE_GEMV(c10::Half)
#undef MOLM_DEFINE_GEMV

}  // namespace molm::cpu::bodies
#endif
