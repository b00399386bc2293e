// The decode-sized expert GEMV shared by expert_gemm and the fused MoE ops (moe_fused.cpp): fixed work items of
// one depth chunk of one expert's [in, out] weight, fp32 partial sums per chunk, summed in chunk order. Measured on
// 2 AMD EPYC cores, 8 experts of 1024 x 2048 fp32: rows/expert 1: 3.2 ms vs 3.6 ms (at::mm), 4: 3.8 vs 13.4, 8: 6.4
// vs 11.6, 16: 9.7 vs 12.5, 32: 16.9 vs 14.2 (at::mm wins from there).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "dot_rows.h"
#include "gemm.h"
#include "vec.h"

namespace molm::cpu {

constexpr int64_t kGemvMaxRows = 16;  // segments with at most this many rows skip at::mm (measured crossover)
// ... but oneDNN's bf16 GEMM (gemm.h) wins from 5 rows on ([rows, 1024] @ [1024, 2048] on 2 AMD EPYC cores: 4 rows
// 0.107 ms GEMV vs 0.119 ms, 8 rows 0.209 vs 0.130, 16 rows 0.381 vs 0.165)
constexpr int64_t kGemvMaxRowsNativeBf16 = 4;
constexpr int64_t kStreamMaxRows = 4;     // up to this many rows stream the weight block once ...
constexpr int64_t kSubCols = 128;         // ... above that, 128-column sub-blocks are re-read from L2 per 4 rows
constexpr int64_t kGemvDepthChunk = 256;  // weight rows per partial sum (fixed: results do not depend on threads)
constexpr int64_t kGemvColBlock = 4096;   // output columns per work item

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest expert segment the streaming GEMV serves for activations of this dtype.
inline int64_t gemv_max_rows(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && native_bf16_gemm() ? kGemvMaxRowsNativeBf16 : kGemvMaxRows;
}

// y[r * ldy + c] = sum_{d < depth} x[r * ldx + d] * w[d * ldw + c] for r < rows, c < cols (y overwritten): one
// depth chunk of an [in, out] weight block.
template <typename w_t>
inline void gemv_chunk(GemvFn<w_t> gemv, const float* x, int64_t ldx, int64_t rows, int64_t depth, const w_t* w,
                       int64_t ldw, float* y, int64_t ldy, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) std::fill(y + r * ldy, y + r * ldy + cols, 0.f);
  const int64_t sub_cols = rows <= kStreamMaxRows ? cols : kSubCols;
  for (int64_t c = 0; c < cols; c += sub_cols)  // L2-sized sub-blocks, re-read once per 4 rows
    gemv(x, ldx, rows, depth, w + c, ldw, y + c, ldy, std::min(sub_cols, cols - c));
}

// int8 weights (molm.quantize) are stored as output rows [out, in] with one fp32 scale per output row; a decode
// GEMV takes this many output rows per work item.
constexpr int64_t kQ8RowBlock = 256;

// y[m * ldy + r] = scale[r] * sum_k x[m * K + k] q[r * ldq + k] for the M rows of x and `rows` weight rows
inline void gemv_rows_q8(Isa isa, const float* x, int64_t M, int64_t K, const int8_t* q, int64_t ldq,
                         const float* scale, int64_t rows, float* y, int64_t ldy) {
  dot_rows<int8_t>(isa, x, nullptr, M, K, q, ldq, rows, y, ldy);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < rows; ++r) y[m * ldy + r] *= scale[r];
}

}  // namespace molm::cpu
