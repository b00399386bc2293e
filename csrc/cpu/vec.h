// Small fp32 micro-kernels used by the CPU ops. Each has a portable scalar body and, on x86-64, bodies for wider
// instruction sets (vec_avx2.cpp, vec_avx512.cpp, compiled with per-function target attributes), so the extension
// is built for the baseline ISA and loads on any x86-64. The best set the CPU supports is picked once from cpuid;
// set_active_isa switches (tests and benchmarks compare bodies). Within one set, results are bitwise repeatable.
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
// Streams `depth` weight rows once for all m together.
template <typename w_t>
using GemvFn = void (*)(const float* x, int64_t ldx, int64_t rows, int64_t depth, const w_t* w, int64_t ldw, float* y,
                        int64_t ldy, int64_t cols);

// The GEMV body of the active instruction set, for w_t = float, c10::BFloat16, c10::Half. An op takes it once per
// call, so one call never mixes bodies.
template <typename w_t>
GemvFn<w_t> gemv_body();

// Instruction sets with their own bodies, in increasing order.
//   avx2:        AVX2 + FMA + F16C
//   avx512:      AVX-512 F/BW/DQ/VL (+ avx2): fp32 FMA over 16 lanes, bf16/fp16 weights converted to fp32
//   avx512_bf16: + AVX512_BF16: bf16 weights through _mm512_dpbf16_ps (pairs of depth rows per instruction)
// dot / axpy / to_float have avx2 and avx512 bodies (the avx512 ones under both avx512 sets).
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
constexpr int kNumIsas = 4;

const char* isa_name(Isa isa);
bool isa_supported(Isa isa);  // by this CPU (and OS)
Isa active_isa();
// Throws c10::ValueError naming the set when this CPU lacks it.
void set_active_isa(Isa isa);

// True when the AVX2+FMA (or wider) bodies are in use.
bool using_avx2();

}  // namespace molm::cpu
