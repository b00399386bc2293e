// CPU kernels of the int8 weight-only ops (molm.quantize): symmetric int8 weights with one fp32 scale per output
// channel, activations in the model dtype, fp32 accumulation: y = (sum_k x_k q_k) * scale.
//   expert_gemm_q8: experts stored [E, N, K] (output rows, so a GEMV streams contiguous rows), scales [E, N]
//   linear_q8:      nn.Linear layout [N, K], scales [N]
// Decode-sized inputs stream the int8 weights once, widening them to fp32 in registers (half the bytes of bf16 for
// the same FMAs): every output is one dot product over a contiguous weight row, computed by one thread in a fixed
// order, so results do not depend on the thread count or on the other rows. Larger inputs (prefill) dequantise one
// expert / weight block at a time to fp32 and use at::mm.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "expert_gemv.h"
#include "gelu.h"
#include "thread_pool.h"
#include "vec.h"

namespace molm::cpu {
namespace {

// fp32 copy of the int8 rows q [N, K] times their scales s [N]
at::Tensor dequantize_rows(const at::Tensor& q, const at::Tensor& s) { return q.to(at::kFloat) * s.unsqueeze(1); }

at::Tensor expert_gemm_q8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                              const at::Tensor& expert_offsets, c10::string_view activation) {
  check_expert_gemm_q8(x, qweight, scale, expert_offsets, activation);
  const int64_t m = x.size(0), depth = x.size(1), n_experts = qweight.size(0), cols = qweight.size(1);
  const std::vector<int64_t> b = read_expert_offsets("molm::expert_gemm_q8", expert_offsets, m);
  at::Tensor y = at::empty({m, cols}, x.options().dtype(at::kFloat));  // fp32, rounded once at the end
  if (y.numel() == 0) return y.to(x.scalar_type());
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor s32 = scale.to(at::kFloat).contiguous();  // [E, N]
  const float* xp = x32.data_ptr<float>();
  const float* sp = s32.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const int64_t qs0 = qweight.stride(0), qs1 = qweight.stride(1);
  const bool gemv_ok = qweight.stride(2) == 1 && depth > 0;
  struct Item {
    int64_t expert, lo, rows, r0;
  };
  std::vector<Item> items;
  const int64_t n_blocks = (cols + kQ8RowBlock - 1) / kQ8RowBlock;
  for (int64_t e = 0; e < n_experts; ++e) {
    const int64_t rows = b[e + 1] - b[e];
    if (rows == 0) continue;
    if (gemv_ok && rows <= kGemvMaxRows) {
      for (int64_t blk = 0; blk < n_blocks; ++blk) items.push_back({e, b[e], rows, blk * kQ8RowBlock});
    } else {  // prefill: one dequantised expert at a time
      at::Tensor seg = y.narrow(0, b[e], rows);
      at::mm_out(seg, x32.narrow(0, b[e], rows), dequantize_rows(qweight[e], s32[e]).t());
    }
  }
  const Isa isa = active_isa();  // one body for the whole call
  parallel_items(static_cast<int64_t>(items.size()), max_threads(), [&](int64_t i, int) {
    const Item& it = items[i];
    gemv_rows_q8(isa, xp + it.lo * depth, it.rows, depth, qp + it.expert * qs0 + it.r0 * qs1, qs1,
                 sp + it.expert * cols + it.r0, std::min(kQ8RowBlock, cols - it.r0), yp + it.lo * cols + it.r0, cols);
  });
  if (activation == "gelu_new") gelu_rows<float>(y, 0, m);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor linear_q8_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                         const c10::optional<at::Tensor>& bias) {
  check_linear_q8(x, qweight, scale, bias);
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor s32 = scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x32.options());
  if (y.numel() > 0 && M <= kGemvMaxRows && qweight.stride(1) == 1 && K > 0) {
    // decode: each work item finishes its outputs (bias, rounding), so no ATen op runs on the [M, N] result (a copy
    // of the lm_head's row would open an OpenMP region)
    at::Tensor out = at::empty({M, N}, x.options());
    const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
    const float* xp = x32.data_ptr<float>();
    const float* sp = s32.data_ptr<float>();
    const int8_t* qp = qweight.data_ptr<int8_t>();
    float* yp = y.data_ptr<float>();
    const int64_t ldq = qweight.stride(0), n_items = (N + kQ8RowBlock - 1) / kQ8RowBlock;
    const Isa isa = active_isa();
    MOLM_DISPATCH_FLOATING(x.scalar_type(), "molm::linear_q8", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      parallel_items(n_items, max_threads(), [&](int64_t it, int) {
        const int64_t r0 = it * kQ8RowBlock, rows = std::min(kQ8RowBlock, N - r0);
        gemv_rows_q8(isa, xp, M, K, qp + r0 * ldq, ldq, sp + r0, rows, yp + r0, N);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t r = r0; r < r0 + rows; ++r)
            op[m * N + r] = static_cast<scalar_t>(bp ? yp[m * N + r] + bp[r] : yp[m * N + r]);
      });
    });
    return out;
  }
  if (y.numel() > 0) {
    constexpr int64_t kBlock = 4096;  // dequantise this many weight rows at a time: bounded extra memory
    for (int64_t r0 = 0; r0 < N; r0 += kBlock) {
      const int64_t rows = std::min(kBlock, N - r0);
      y.narrow(1, r0, rows)
          .copy_(at::mm(x32, dequantize_rows(qweight.narrow(0, r0, rows), s32.narrow(0, r0, rows)).t()));
    }
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace
}  // namespace molm::cpu

TORCH_LIBRARY_IMPL(molm, CPU, m) {
  m.impl("expert_gemm_q8", &molm::cpu::expert_gemm_q8_cpu);
  m.impl("linear_q8", &molm::cpu::linear_q8_cpu);
}
