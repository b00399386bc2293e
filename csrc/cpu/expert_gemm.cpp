// CPU grouped expert GEMM over contiguous expert segments, plus its weight-gradient helper.
// Small segments (decode) use the streaming GEMV of expert_gemv.h, split into (depth chunk x column block) items run
// on the molm thread pool (thread_pool.h) and reduced in a fixed order; larger segments call at::mm (MKL / oneDNN,
// itself multithreaded) on views of each segment.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "thread_pool.h"
#include "gelu.h"
#include "expert_gemv.h"
#include "gemm.h"
#include "vec.h"

namespace molm::cpu {
namespace {

struct Segment {
  int64_t expert, lo, rows, compact;  // compact: first row in the packed small-segment buffers
};

// out[seg rows] = x[seg rows] @ weight[e] for all small segments, through fp32 partial sums per depth chunk. One
// parallel region: the item that finishes a (segment, column block) last sums its depth chunks in chunk order, so
// the result does not depend on which thread ran which item.
template <typename scalar_t>
void gemv_segments(const at::Tensor& x, const at::Tensor& weight, const std::vector<Segment>& segs, int64_t m_small,
                   bool gelu, at::Tensor& out) {
  const int64_t depth = x.size(1), cols = weight.size(2);
  const int64_t n_kc = ceil_div(depth, kGemvDepthChunk), n_cb = ceil_div(cols, kGemvColBlock);
  at::Tensor xs = at::empty({m_small, depth}, x.options().dtype(at::kFloat));  // [M_small, K] fp32
  for (const auto& s : segs) xs.narrow(0, s.compact, s.rows).copy_(x.narrow(0, s.lo, s.rows));
  at::Tensor partial = at::empty({n_kc, m_small, cols}, xs.options());  // [chunks, M_small, Nout]
  const float* xp = xs.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1);
  const int64_t n_blocks = static_cast<int64_t>(segs.size()) * n_cb;  // (segment, column block) pairs
  std::unique_ptr<std::atomic<int64_t>[]> chunks_left(new std::atomic<int64_t>[n_blocks]);
  for (int64_t i = 0; i < n_blocks; ++i) chunks_left[i].store(n_kc, std::memory_order_relaxed);
  const GemvFn<scalar_t> gemv = gemv_body<scalar_t>();
  parallel_items(n_blocks * n_kc, max_threads(), [&](int64_t it, int) {
    // items in memory order: a segment's depth chunks, each across its column blocks
    const int64_t seg = it / (n_kc * n_cb), kc = (it / n_cb) % n_kc, cb = it % n_cb;
    const Segment& s = segs[seg];
    const int64_t block = seg * n_cb + cb;
    const int64_t r0 = kc * kGemvDepthChunk, r1 = std::min(depth, r0 + kGemvDepthChunk);
    const int64_t c0 = cb * kGemvColBlock, c1 = std::min(cols, c0 + kGemvColBlock);
    float* y = pp + (kc * m_small + s.compact) * cols + c0;
    const float* xs0 = xp + s.compact * depth + r0;
    const scalar_t* w0 = wp + s.expert * ws0 + r0 * ws1 + c0;
    gemv_chunk(gemv, xs0, depth, s.rows, r1 - r0, w0, ws1, y, cols, c1 - c0);
    if (chunks_left[block].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    // last chunk of this block: fixed-order reduction over the depth chunks
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t c = c0; c < c1; ++c) {
        float acc = 0.f;
        for (int64_t k = 0; k < n_kc; ++k) acc += pp[(k * m_small + s.compact + r) * cols + c];
        const scalar_t pre = static_cast<scalar_t>(acc);  // rounded first, as on the at::mm path
        op[(s.lo + r) * cols + c] = gelu ? static_cast<scalar_t>(gelu_new(static_cast<float>(pre))) : pre;
      }
  });
}

at::Tensor expert_gemm_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets,
                           c10::string_view activation) {
  check_expert_gemm(x, weight, expert_offsets, activation);
  const int64_t m = x.size(0), n_experts = weight.size(0), cols = weight.size(2);
  const std::vector<int64_t> b = read_expert_offsets("molm::expert_gemm", expert_offsets, m);
  at::Tensor out = at::empty({m, cols}, x.options());  // [M, Nout]
  if (out.numel() == 0) return out;
  const bool gemv_ok = weight.stride(2) == 1 && x.scalar_type() != at::kDouble && x.size(1) > 0;
  const bool gelu = activation == "gelu_new";  // gelu_new == GELU with the tanh approximation
  std::vector<Segment> small;
  int64_t m_small = 0;
  const int64_t max_rows = gemv_max_rows(x.scalar_type());
  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t rows = b[e + 1] - b[e];
    if (rows == 0) continue;
    if (gemv_ok && rows <= max_rows) {
      small.push_back({e, b[e], rows, m_small});
      m_small += rows;
    } else {
      at::Tensor seg = out.narrow(0, b[e], rows);  // [rows, Nout], contiguous
      mm_into(seg, x.narrow(0, b[e], rows), weight[e]);
      if (gelu)
        MOLM_DISPATCH_FLOATING(x.scalar_type(), "molm::expert_gemm", [&] {
          if constexpr (std::is_same_v<scalar_t, double>)
            at::gelu_(seg, "tanh");  // fp64: ATen's, in double
          else
            gelu_rows<scalar_t>(out, b[e], b[e + 1]);
        });
    }
  }
  if (!small.empty())
    MOLM_DISPATCH_FLOATING(x.scalar_type(), "molm::expert_gemm", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) gemv_segments<scalar_t>(x, weight, small, m_small, gelu, out);
    });
  return out;
}

// grad_weight[e] = x[rows of e]^T @ grad_out[rows of e]; one at::mm per non-empty expert, no atomics.
at::Tensor expert_gemm_wgrad_cpu(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& expert_offsets,
                                 int64_t num_experts) {
  check_expert_gemm_wgrad(x, grad_out, expert_offsets, num_experts);
  const std::vector<int64_t> b = read_expert_offsets("molm::expert_gemm_wgrad", expert_offsets, x.size(0));
  at::Tensor grad_w = at::zeros({num_experts, x.size(1), grad_out.size(1)}, x.options());  // [E, K, Nout]
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t rows = b[e + 1] - b[e];
    if (rows == 0) continue;
    at::Tensor dst = grad_w[e];
    mm_into(dst, x.narrow(0, b[e], rows).t(), grad_out.narrow(0, b[e], rows));
  }
  return grad_w;
}

}  // namespace
}  // namespace molm::cpu

TORCH_LIBRARY_IMPL(molm, CPU, m) {
  m.impl("expert_gemm", &molm::cpu::expert_gemm_cpu);
  m.impl("expert_gemm_wgrad", &molm::cpu::expert_gemm_wgrad_cpu);
}
