// Micro-kernels of vec.h: the scalar bodies, the choice of instruction set, and the dispatch to the bodies of
// vec_avx2.cpp / vec_avx512.cpp.
#include "vec.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "vec_bodies.h"

namespace molm::cpu {
namespace {

// ---------------------------------------------------------------- scalar bodies
float dot_scalar(const float* a, const float* b, int64_t n) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int u = 0; u < 4; ++u) acc[u] += a[i + u] * b[i + u];
  float s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_scalar(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

template <typename w_t>
void gemv_scalar(const float* x, int64_t ldx, int64_t rows, int64_t depth, const w_t* w, int64_t ldw, float* y,
                 int64_t ldy, int64_t cols) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t r = 0; r < depth; ++r) {
      const float a = x[m * ldx + r];
      const w_t* wr = w + r * ldw;
      float* ym = y + m * ldy;
      for (int64_t c = 0; c < cols; ++c) ym[c] += a * static_cast<float>(wr[c]);
    }
}

// ---------------------------------------------------------------- instruction set
bool detect(Isa isa) {
#ifdef MOLM_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return avx2;
    case Isa::kAvx512:
      return avx512;
    case Isa::kAvx512Bf16:
      return avx512 && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

// MOLM_CPU_ISA_MAX=<name>, read once at load: treat the sets above <name> as missing (to reproduce what a CPU
// without them computes). An unknown name is ignored.
int isa_cap() {
  const char* cap = std::getenv("MOLM_CPU_ISA_MAX");
  for (int i = 0; cap && i < kNumIsas; ++i)
    if (std::strcmp(cap, isa_name(static_cast<Isa>(i))) == 0) return i;
  return kNumIsas - 1;
}
const int kIsaCap = isa_cap();

bool available(Isa isa) { return static_cast<int>(isa) <= kIsaCap && detect(isa); }

Isa detect_best() {
  Isa best = Isa::kScalar;
  for (int i = 0; i < kNumIsas; ++i)
    if (available(static_cast<Isa>(i))) best = static_cast<Isa>(i);
  return best;
}

const Isa kBestIsa = detect_best();
std::atomic<int> g_active_isa{static_cast<int>(kBestIsa)};

// The dot / axpy / to_float bodies: avx2 under avx2, avx512 under both avx512 sets.
inline bool vector_helpers() { return active_isa() != Isa::kScalar; }
inline bool avx512_helpers() { return active_isa() >= Isa::kAvx512; }

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
  }
  return "?";
}

bool isa_supported(Isa isa) { return available(isa); }

Isa active_isa() { return static_cast<Isa>(g_active_isa.load(std::memory_order_relaxed)); }

void set_active_isa(Isa isa) {
  TORCH_CHECK_VALUE(isa_supported(isa), "molm CPU instruction set '", isa_name(isa),
                    "' is not supported by this CPU (the best it supports is '", isa_name(kBestIsa), "'",
                    kIsaCap < kNumIsas - 1 ? ", capped by MOLM_CPU_ISA_MAX" : "", ")");
  g_active_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

bool using_avx2() { return vector_helpers(); }

float dot(const float* a, const float* b, int64_t n) {
#ifdef MOLM_X86
  if (avx512_helpers()) return bodies::dot_avx512(a, b, n);
  if (vector_helpers()) return bodies::dot_avx2(a, b, n);
#endif
  return dot_scalar(a, b, n);
}

double dot(const double* a, const double* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
#ifdef MOLM_X86
  if (avx512_helpers()) return bodies::axpy_avx512(alpha, x, y, n);
  if (vector_helpers()) return bodies::axpy_avx2(alpha, x, y, n);
#endif
  axpy_scalar(alpha, x, y, n);
}

void axpy(double alpha, const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
#ifdef MOLM_X86
  if (avx512_helpers()) return bodies::to_float_avx512(src, dst, n);
  if (vector_helpers()) return bodies::to_float_avx2(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void to_float(const c10::Half* src, float* dst, int64_t n) {
#ifdef MOLM_X86
  if (avx512_helpers()) return bodies::to_float_avx512(src, dst, n);
  if (vector_helpers()) return bodies::to_float_avx2(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// The overloads of a body, as a function pointer of one weight type.
#define MOLM_BODY(NAME, W_T) static_cast<GemvFn<W_T>>(&bodies::NAME)

template <>
GemvFn<float> gemv_body<float>() {
#ifdef MOLM_X86
  switch (active_isa()) {
    case Isa::kAvx512Bf16:  // no fp32 use for bf16 dot products
    case Isa::kAvx512:
      return MOLM_BODY(gemv_avx512, float);
    case Isa::kAvx2:
      return MOLM_BODY(gemv_avx2, float);
    case Isa::kScalar:
      break;
  }
#endif
  return &gemv_scalar<float>;
}

template <>
GemvFn<c10::BFloat16> gemv_body<c10::BFloat16>() {
#ifdef MOLM_X86
  switch (active_isa()) {
    case Isa::kAvx512Bf16:
      return &bodies::gemv_avx512_bf16;
    case Isa::kAvx512:
      return MOLM_BODY(gemv_avx512, c10::BFloat16);
    case Isa::kAvx2:
      return MOLM_BODY(gemv_avx2, c10::BFloat16);
    case Isa::kScalar:
      break;
  }
#endif
  return &gemv_scalar<c10::BFloat16>;
}

template <>
GemvFn<c10::Half> gemv_body<c10::Half>() {
#ifdef MOLM_X86
  switch (active_isa()) {
    case Isa::kAvx512Bf16:  // fp16 has no dot-product instruction here: converted to fp32
    case Isa::kAvx512:
      return MOLM_BODY(gemv_avx512, c10::Half);
    case Isa::kAvx2:
      return MOLM_BODY(gemv_avx2, c10::Half);
    case Isa::kScalar:
      break;
  }
#endif
  return &gemv_scalar<c10::Half>;
}

#undef MOLM_BODY

}  // namespace molm::cpu
