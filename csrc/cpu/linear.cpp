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

// Each work item finishes its own outputs (bias, GELU, rounding): no ATen op runs on the [M, N] result, so a
// decode step's lm_head opens no OpenMP region (ATen parallelises a copy of more than 32768 elements).
template <typename scalar_t>
void linear_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool gelu,
                 at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();  // [M, K]: a few KB, read from L1 for every weight row
  const at::Tensor xc = x.contiguous();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x32.options());  // fp32 dot products, rounded once below
  const float* xp = x32.data_ptr<float>();
  const scalar_t* x16 = xc.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t ldw = weight.stride(0);
  const int64_t n_items = (N + kRowsPerItem - 1) / kRowsPerItem;
  const Isa isa = active_isa();  // one body for the whole call
  parallel_items(n_items, max_threads(), [&](int64_t it, int) {
    const int64_t r0 = it * kRowsPerItem, rows = std::min(kRowsPerItem, N - r0);
    dot_rows<scalar_t>(isa, xp, x16, M, K, wp + r0 * ldw, ldw, rows, yp + r0, N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = r0; r < r0 + rows; ++r) {
        float v = yp[m * N + r];
        if (bp) v += bp[r];
        op[m * N + r] = gelu ? gelu_after_rounding<scalar_t>(v) : static_cast<scalar_t>(v);
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
  } else {  // bias in 16 bits, or a GELU: finished in fp32, rounded once
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
