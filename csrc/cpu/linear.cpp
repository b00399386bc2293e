// CPU kernel of molm::linear: y = x @ weight^T (+ bias) for nn.Linear weights [N, K] (lm_head, routers, K/V
// projections). Decode-sized inputs (M <= kGemvMaxRows rows) stream each weight row once: every output is one dot
// product over a contiguous weight row, computed for four weight rows at a time and all M input rows, with fp32
// accumulators in registers and whole outputs per thread (no split-K, so results do not depend on the thread
// count). 16-bit weights are read as they are stored (bf16 with AVX-512-BF16 dot products where the CPU has them),
// never through ATen's 16-bit CPU GEMV. Larger M goes to the GEMM this CPU runs fastest (gemm.h). The optional GELU
// is applied as nn.Linear followed by nn.GELU computes it: to the result rounded to x's dtype, rounded again.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "dot_rows.h"
#include "gelu.h"
#include "gemm.h"
#include "thread_pool.h"
#include "vec.h"

namespace molm::cpu {
namespace {

constexpr int64_t kGemvMaxRows = 16;  // input rows up to which the streaming path wins over at::mm
constexpr int64_t kRowsPerItem = 64;  // weight rows (outputs) per parallel work item

// Each work item finishes its own outputs (bias, GELU, rounding) from a per-thread fp32 block: no ATen op runs on
// the [M, N] result, so a decode step's lm_head opens no OpenMP region (ATen parallelises a copy of more than 32768
// elements), and the inputs are read without ATen conversions (a decode step makes about a hundred of these calls).
template <typename scalar_t>
void linear_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool gelu,
                 at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  std::vector<float> x32(M * K);     // [M, K] in fp32: a few KB, read from L1 for every weight row
  std::vector<scalar_t> x16(M * K);  // [M, K] as stored, contiguous (the bf16 dot-product body's input)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      x16[m * K + k] = xp[m * xs0 + k * xs1];
      x32[m * K + k] = static_cast<float>(x16[m * K + k]);
    }
  const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
  const int64_t bs = bias.has_value() ? bias->stride(0) : 0;
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t ldw = weight.stride(0);
  const int64_t n_items = (N + kRowsPerItem - 1) / kRowsPerItem;
  const int threads = max_threads();
  std::vector<float> blocks(static_cast<size_t>(threads) * M * kRowsPerItem);  // per-thread [M, kRowsPerItem]
  const Isa isa = active_isa();                                                // one body for the whole call
  parallel_items(n_items, threads, [&](int64_t it, int slot) {
    const int64_t r0 = it * kRowsPerItem, rows = std::min(kRowsPerItem, N - r0);
    float* y = blocks.data() + slot * M * kRowsPerItem;
    dot_rows<scalar_t>(isa, x32.data(), x16.data(), M, K, wp + r0 * ldw, ldw, rows, y, kRowsPerItem);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < rows; ++r) {
        float v = y[m * kRowsPerItem + r];
        if (bp) v += static_cast<float>(bp[(r0 + r) * bs]);
        op[m * N + r0 + r] = gelu ? gelu_after_rounding<scalar_t>(v) : static_cast<scalar_t>(v);
      }
  });
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      c10::string_view activation) {
  check_linear(x, weight, bias, activation);
  const bool gelu = activation == "gelu";
  const int64_t M = x.size(0), N = weight.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (out.numel() == 0) return out;
  const bool gemv = M <= kGemvMaxRows && x.scalar_type() != at::kDouble && weight.stride(1) == 1 && x.size(1) > 0;
  if (gemv) {
    MOLM_DISPATCH_FLOATING(x.scalar_type(), "molm::linear", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) linear_gemv<scalar_t>(x, weight, bias, gelu, out);
    });
    return out;
  }
  if (x.scalar_type() == at::kDouble) {
    if (bias.has_value())
      at::addmm_out(out, *bias, x, weight.t());
    else
      mm_into(out, x, weight.t());
    return gelu ? out.copy_(at::gelu(out)) : out;  // fp64: ATen's GELU, in double
  }
  if (!gelu && !bias.has_value()) {
    mm_into(out, x, weight.t());
  } else if (!gelu && x.scalar_type() == at::kFloat) {
    at::addmm_out(out, *bias, x, weight.t());
  } else {  // bias in 16 bits, or a GELU: the bias added in fp32, then rounded as linear_gemv rounds
    at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
    mm_into(y, x.to(at::kFloat), weight.t().to(at::kFloat));
    if (bias.has_value()) y.add_(bias->to(at::kFloat));
    if (gelu) {
      MOLM_DISPATCH_FLOATING(x.scalar_type(), "molm::linear", [&] {
        if constexpr (!std::is_same_v<scalar_t, double>) gelu_rows_after_rounding<scalar_t>(y);
      });
    }
    out.copy_(y);
  }
  return out;
}

}  // namespace
}  // namespace molm::cpu

TORCH_LIBRARY_IMPL(molm, CPU, m) { m.impl("linear", &molm::cpu::linear_cpu); }
