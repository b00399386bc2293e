// gelu_new for the CPU kernels: one scalar function for every element, so a row's result never depends on the
// thread count or on the rows around it.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "thread_pool.h"

namespace molm::cpu {

// gelu_new (GELU, tanh approximation) of one fp32 value: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), stable at both
// ends. One scalar function for every element on both paths: ATen's gelu gives an element a different value
// depending on whether a thread's chunk puts it in the vectorized body or the scalar tail, so a row's result would
// depend on the thread count and on the rows around it.
inline float gelu_new(float x) {
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  constexpr float kKappa = 0.044715f;
  return x / (1.f + std::exp(-2.f * kBeta * (x + kKappa * x * x * x)));
}

// Exact GELU (nn.GELU's default) of one fp32 value: 0.5 x (1 + erf(x / sqrt 2)).
inline float gelu_erf(float x) { return 0.5f * x * (1.f + std::erf(x * 0.7071067811865476f)); }

// GELU of a projection's fp32 result as nn.Linear then nn.GELU compute it in x's dtype: the projection rounded to
// scalar_t, its GELU in fp32, rounded again (for fp32 both roundings are exact).
template <typename scalar_t>
inline scalar_t gelu_after_rounding(float v) {
  return static_cast<scalar_t>(gelu_erf(static_cast<float>(static_cast<scalar_t>(v))));
}

// The same over an fp32 tensor in place (values left as scalar_t-representable floats), on the molm pool: never an
// ATen region, since ATen's GELU wakes its OpenMP workers even for one router row.
template <typename scalar_t>
void gelu_rows_after_rounding(at::Tensor& y) {
  constexpr int64_t kBlock = 16384;  // elements per work item
  float* p = y.data_ptr<float>();
  const int64_t n = y.numel();
  parallel_items((n + kBlock - 1) / kBlock, max_threads(), [&](int64_t item, int) {
    for (int64_t i = item * kBlock; i < std::min(n, (item + 1) * kBlock); ++i)
      p[i] = static_cast<float>(gelu_after_rounding<scalar_t>(p[i]));
  });
}

// rows [lo, hi) of out, in place
template <typename scalar_t>
void gelu_rows(at::Tensor& out, int64_t lo, int64_t hi) {
  constexpr int64_t kBlock = 16384;  // elements per work item
  scalar_t* p = out.data_ptr<scalar_t>() + lo * out.size(1);
  const int64_t n = (hi - lo) * out.size(1);
  parallel_items((n + kBlock - 1) / kBlock, max_threads(), [&](int64_t item, int) {
    for (int64_t i = item * kBlock; i < std::min(n, (item + 1) * kBlock); ++i)
      p[i] = static_cast<scalar_t>(gelu_new(static_cast<float>(p[i])));
  });
}

}  // namespace molm::cpu
