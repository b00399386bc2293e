// Small fp32 micro-kernels used by the CPU ops. Each has a portable scalar body and, on x86-64, an AVX2+FMA body
// chosen once at run time (the extension itself is compiled for the baseline ISA, so it loads on any x86-64).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace molm::cpu {

// sum_i a[i] * b[i]
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);

// y[i] += alpha * x[i]
void axpy(float alpha, const float* x, float* y, int64_t n);
void axpy(double alpha, const double* x, double* y, int64_t n);

// dst[i] = float(src[i])
void to_float(const c10::BFloat16* src, float* dst, int64_t n);
void to_float(const c10::Half* src, float* dst, int64_t n);

// Small-M GEMV over a row-major weight block: for m < rows (any; groups of 4 re-read the block),
//   y[m * ldy + c] += sum_{r < depth} x[m * ldx + r] * w[r * ldw + c]   for c < cols.
// Streams `depth` weight rows once, four at a time, for all m together.
void gemv_rows(const float* x, int64_t ldx, int64_t rows, int64_t depth, const float* w, int64_t ldw, float* y,
               int64_t ldy, int64_t cols);
void gemv_rows(const float* x, int64_t ldx, int64_t rows, int64_t depth, const c10::BFloat16* w, int64_t ldw,
               float* y, int64_t ldy, int64_t cols);
void gemv_rows(const float* x, int64_t ldx, int64_t rows, int64_t depth, const c10::Half* w, int64_t ldw, float* y,
               int64_t ldy, int64_t cols);

// True when the AVX2+FMA bodies are in use.
bool using_avx2();

}  // namespace molm::cpu
