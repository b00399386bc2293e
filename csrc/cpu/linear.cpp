// CPU kernel of molm::linear: y = x @ weight^T (+ bias) for nn.Linear weights [N, K] (lm_head, routers, K/V
// projections). Decode-sized inputs (M <= kGemvMaxRows rows) stream each weight row once: every output is one dot
// product over a contiguous weight row, computed for four weight rows at a time and all M input rows, with fp32
// accumulators in registers and whole outputs per thread (no split-K, so results do not depend on the thread
// count). 16-bit weights are read as they are stored (bf16 with AVX-512-BF16 dot products where the CPU has them),
// never through ATen's 16-bit CPU GEMV. Larger M goes to the GEMM this CPU runs fastest (gemm.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../dispatch.h"
#include "gemm.h"
#include "simd.h"
#include "thread_pool.h"
#include "vec.h"

namespace molm::cpu {
namespace {

constexpr int64_t kGemvMaxRows = 16;  // input rows up to which the streaming path wins over at::mm
constexpr int64_t kRowsPerItem = 64;  // weight rows (outputs) per parallel work item

// y[m * ldy + r] = sum_k x[m * K + k] * w[r * ldw + k] for m < M, r < R (R <= 4 per call of the bodies below).
template <typename w_t>
void dot_rows_scalar(const float* x, int64_t M, int64_t K, const w_t* w, int64_t ldw, int64_t R, float* y,
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
using simd::hsum8;
using simd::load16;
using simd::load8;

template <typename w_t>
MOLM_TARGET_AVX2 void dot_rows_avx2(const float* x, int64_t M, int64_t K, const w_t* w, int64_t ldw, int64_t R,
                                    float* y, int64_t ldy) {
  if (R < 4) return dot_rows_scalar(x, M, K, w, ldw, R, y, ldy);
  const w_t* w0 = w;
  const w_t* w1 = w0 + ldw;
  const w_t* w2 = w1 + ldw;
  const w_t* w3 = w2 + ldw;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 xv = _mm256_loadu_ps(xm + k);
      a0 = _mm256_fmadd_ps(xv, load8(w0 + k), a0);
      a1 = _mm256_fmadd_ps(xv, load8(w1 + k), a1);
      a2 = _mm256_fmadd_ps(xv, load8(w2 + k), a2);
      a3 = _mm256_fmadd_ps(xv, load8(w3 + k), a3);
    }
    float s[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
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
template <typename w_t>
MOLM_TARGET_AVX512 void dot_rows_avx512(const float* x, int64_t M, int64_t K, const w_t* w, int64_t ldw, int64_t R,
                                        float* y, int64_t ldy) {
  if (R < 4) return dot_rows_scalar(x, M, K, w, ldw, R, y, ldy);
  const w_t* w0 = w;
  const w_t* w1 = w0 + ldw;
  const w_t* w2 = w1 + ldw;
  const w_t* w3 = w2 + ldw;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 xv = _mm512_loadu_ps(xm + k);
      a0 = _mm512_fmadd_ps(xv, load16(w0 + k), a0);
      a1 = _mm512_fmadd_ps(xv, load16(w1 + k), a1);
      a2 = _mm512_fmadd_ps(xv, load16(w2 + k), a2);
      a3 = _mm512_fmadd_ps(xv, load16(w3 + k), a3);
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
MOLM_TARGET_AVX512BF16 void dot_rows_avx512_bf16(const c10::BFloat16* x, int64_t M, int64_t K, const c10::BFloat16* w,
                                                 int64_t ldw, int64_t R, float* y, int64_t ldy) {
  for (int64_t r0 = 0; r0 < R; r0 += 4) {
    const int64_t rr = std::min<int64_t>(4, R - r0);
    const c10::BFloat16* wr[4];
    for (int r = 0; r < 4; ++r) wr[r] = w + (r0 + std::min<int64_t>(r, rr - 1)) * ldw;  // clamp: reads stay valid
    for (int64_t m = 0; m < M; ++m) {
      const c10::BFloat16* xm = x + m * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
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
void dot_rows(Isa isa, const float* x, const w_t* x16, int64_t M, int64_t K, const w_t* w, int64_t ldw, int64_t R,
              float* y, int64_t ldy) {
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

template <typename scalar_t>
void linear_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                 at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();  // [M, K]: a few KB, read from L1 for every weight row
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x32.options());  // fp32 dot products, rounded once below
  const float* xp = x32.data_ptr<float>();
  const scalar_t* x16 = xc.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  float* yp = y.data_ptr<float>();
  const int64_t ldw = weight.stride(0);
  const int64_t n_items = (N + kRowsPerItem - 1) / kRowsPerItem;
  const Isa isa = active_isa();  // one body for the whole call
  parallel_items(n_items, max_threads(), [&](int64_t it, int) {
    const int64_t r0 = it * kRowsPerItem, rows = std::min(kRowsPerItem, N - r0);
    dot_rows<scalar_t>(isa, xp, x16, M, K, wp + r0 * ldw, ldw, rows, yp + r0, N);
  });
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  out.copy_(y);
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_linear(x, weight, bias);
  const int64_t M = x.size(0), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (out.numel() == 0) return out;
  const bool gemv = M <= kGemvMaxRows && x.scalar_type() != at::kDouble && weight.stride(1) == 1 && x.size(1) > 0;
  if (gemv) {
    MOLM_DISPATCH_FLOATING(x.scalar_type(), "molm::linear", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) linear_gemv<scalar_t>(x, weight, bias, out);
    });
    return out;
  }
  if (!bias.has_value()) {
    mm_into(out, x, weight.t());
  } else if (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) {
    at::addmm_out(out, *bias, x, weight.t());
  } else {  // 16-bit with bias: add it in fp32, round once
    at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
    mm_into(y, x.to(at::kFloat), weight.t().to(at::kFloat));
    out.copy_(y.add_(bias->to(at::kFloat)));
  }
  return out;
}

}  // namespace
}  // namespace molm::cpu

TORCH_LIBRARY_IMPL(molm, CPU, m) { m.impl("linear", &molm::cpu::linear_cpu); }
