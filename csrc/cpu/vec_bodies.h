// The per-instruction-set bodies behind vec.h, one translation unit per set (vec_avx2.cpp, vec_avx512.cpp), each
// function compiled for its set with a target attribute. Only vec.cpp calls them, after checking the CPU has the set.
#pragma once

#include "vec.h"

namespace molm::cpu::bodies {

#define MOLM_DECLARE_GEMV(NAME)                                                                                      \
  void NAME(const float* x, int64_t ldx, int64_t rows, int64_t depth, const float* w, int64_t ldw, float* y,         \
            int64_t ldy, int64_t cols);                                                                              \
  void NAME(const float* x, int64_t ldx, int64_t rows, int64_t depth, const c10::BFloat16* w, int64_t ldw, float* y, \
            int64_t ldy, int64_t cols);                                                                              \
  void NAME(const float* x, int64_t ldx, int64_t rows, int64_t depth, const c10::Half* w, int64_t ldw, float* y,     \
            int64_t ldy, int64_t cols);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOLM_X86 1
float dot_avx2(const float* a, const float* b, int64_t n);
void axpy_avx2(float alpha, const float* x, float* y, int64_t n);
void to_float_avx2(const c10::BFloat16* src, float* dst, int64_t n);
void to_float_avx2(const c10::Half* src, float* dst, int64_t n);
float dot_avx512(const float* a, const float* b, int64_t n);
void axpy_avx512(float alpha, const float* x, float* y, int64_t n);
void to_float_avx512(const c10::BFloat16* src, float* dst, int64_t n);
void to_float_avx512(const c10::Half* src, float* dst, int64_t n);
MOLM_DECLARE_GEMV(gemv_avx2)
MOLM_DECLARE_GEMV(gemv_avx512)
// bf16 weights only; the x values are rounded to bf16 (exact when the op's input is bf16, as it is for bf16 weights)
void gemv_avx512_bf16(const float* x, int64_t ldx, int64_t rows, int64_t depth, const c10::BFloat16* w, int64_t ldw,
                      float* y, int64_t ldy, int64_t cols);
#endif

#undef MOLM_DECLARE_GEMV

}  // namespace molm::cpu::bodies
