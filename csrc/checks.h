// Input validation for every molm op, done once at the C++ boundary and shared by the CPU and CUDA impls.
// TORCH_CHECK_VALUE -> Python ValueError, TORCH_CHECK_TYPE -> Python TypeError. Messages name the op, the
// argument, what was expected and what arrived. Kernels never check.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace molm {

inline void check_rank(const char* op, const char* arg, const at::Tensor& t, int64_t rank) {
  TORCH_CHECK_VALUE(t.dim() == rank, op, ": ", arg, " must have rank ", rank, ", got rank ", t.dim(), " (shape ",
                    t.sizes(), ")");
}

inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, op, ": ", arg,
                   " must be float32, float64, bfloat16 or float16, got ", s);
}

inline void check_same_dtype(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                             const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " must have the dtype of ", ref_arg, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_index(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", arg, " must be int64, got ", t.scalar_type());
  check_rank(op, arg, t, 1);
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", arg, " must be contiguous, got strides ", t.strides());
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg,
                              const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", arg, " must be on the device of ", ref_arg, " (",
                    ref.device(), "), got ", t.device());
}

inline void check_last_dim_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", arg,
                    " must have stride(-1) == 1, got strides ", t.strides(), " for shape ", t.sizes());
}

inline void check_size(const char* op, const char* what, int64_t got, int64_t expected) {
  TORCH_CHECK_VALUE(got == expected, op, ": ", what, " must be ", expected, ", got ", got);
}

// Reads and validates host-side expert offsets: offsets[0] == 0, non-decreasing, offsets[E] == M.
inline std::vector<int64_t> read_expert_offsets(const char* op, const at::Tensor& expert_offsets, int64_t m) {
  const int64_t* p = expert_offsets.data_ptr<int64_t>();
  std::vector<int64_t> b(p, p + expert_offsets.numel());
  TORCH_CHECK_VALUE(b.front() == 0 && b.back() == m, op, ": expert_offsets must start at 0 and end at x.size(0) = ", m,
                    ", got ", b.front(), " .. ", b.back());
  for (size_t e = 0; e + 1 < b.size(); ++e)
    TORCH_CHECK_VALUE(b[e] <= b[e + 1], op, ": expert_offsets must be non-decreasing, got offsets[", e, "] = ", b[e],
                      " > offsets[", e + 1, "] = ", b[e + 1]);
  return b;
}

// logits [N, E] floating, 1 <= k <= E.
inline void check_route_topk(const at::Tensor& logits, int64_t k) {
  const char* op = "molm::route_topk";
  check_rank(op, "logits", logits, 2);
  check_floating(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits must have at least one expert column, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(k >= 1 && k <= logits.size(1), op, ": k must be in 1..E = 1..", logits.size(1), ", got k = ", k);
}

// x [R, C] floating with stride(-1) == 1, index [M] int64 contiguous, group >= 1. Index range is checked in the
// kernel (it needs the data).
inline void check_gather_rows(const at::Tensor& x, const at::Tensor& index, int64_t group) {
  const char* op = "molm::gather_rows";
  check_rank(op, "x", x, 2);
  check_floating(op, "x", x);
  check_last_dim_contiguous(op, "x", x);
  check_index(op, "index", index);
  check_same_device(op, "index", index, "x", x);
  TORCH_CHECK_VALUE(group >= 1, op, ": group must be >= 1, got ", group);
}

// y [M, C], gates [N, k] floating with N*k == M, slot_positions [M] int64.
inline void check_scatter_ksum(const at::Tensor& y, const at::Tensor& gates, const at::Tensor& slot_positions) {
  const char* op = "molm::scatter_ksum";
  check_rank(op, "y", y, 2);
  check_floating(op, "y", y);
  check_last_dim_contiguous(op, "y", y);
  check_rank(op, "gates", gates, 2);
  check_floating(op, "gates", gates);
  check_index(op, "slot_positions", slot_positions);
  check_same_device(op, "gates", gates, "y", y);
  check_same_device(op, "slot_positions", slot_positions, "y", y);
  TORCH_CHECK_VALUE(gates.size(0) * gates.size(1) == y.size(0), op,
                    ": gates [N, k] must have N*k == y.size(0) = ", y.size(0), ", got gates shape ", gates.sizes());
  check_size(op, "slot_positions.numel() (= y.size(0))", slot_positions.numel(), y.size(0));
}

// x [M, K], weight [E, K, Nout] (stride(-1) == 1 or stride(-2) == 1, i.e. a transposed view), offsets [E+1].
inline void check_expert_gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& expert_offsets,
                              c10::string_view activation) {
  const char* op = "molm::expert_gemm";
  check_rank(op, "x", x, 2);
  check_floating(op, "x", x);
  check_last_dim_contiguous(op, "x", x);
  check_rank(op, "weight", weight, 3);
  check_same_dtype(op, "weight", weight, "x", x);
  check_same_device(op, "weight", weight, "x", x);
  TORCH_CHECK_VALUE(weight.stride(2) == 1 || weight.stride(1) == 1 || weight.size(2) <= 1 || weight.size(1) <= 1, op,
                    ": weight must have stride(-1) == 1 or stride(-2) == 1, got strides ", weight.strides());
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), op, ": weight [E, K, Nout] must have K == x.size(1) = ", x.size(1),
                    ", got weight shape ", weight.sizes());
  check_index(op, "expert_offsets", expert_offsets);
  check_same_device(op, "expert_offsets", expert_offsets, "x", x);
  check_size(op, "expert_offsets.numel() (= E + 1)", expert_offsets.numel(), weight.size(0) + 1);
  TORCH_CHECK_VALUE(activation == "none" || activation == "gelu_new", op,
                    ": activation must be 'none' or 'gelu_new', got '", std::string(activation), "'");
}

// x [M, K], weight [N, K] (nn.Linear layout, same dtype and device, stride(-1) == 1), bias [N] or none;
// activation "none" | "gelu" (exact, erf-based: nn.GELU's default).
inline void check_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         c10::string_view activation) {
  const char* op = "molm::linear";
  TORCH_CHECK_VALUE(activation == "none" || activation == "gelu", op, ": activation must be 'none' or 'gelu', got '",
                    std::string(activation), "'");
  check_rank(op, "x", x, 2);
  check_floating(op, "x", x);
  check_rank(op, "weight", weight, 2);
  check_same_dtype(op, "weight", weight, "x", x);
  check_same_device(op, "weight", weight, "x", x);
  check_last_dim_contiguous(op, "weight", weight);
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), op, ": weight [N, K] must have K == x.size(1) = ", x.size(1),
                    ", got weight shape ", weight.sizes());
  if (bias.has_value()) {
    check_rank(op, "bias", *bias, 1);
    check_same_dtype(op, "bias", *bias, "x", x);
    check_same_device(op, "bias", *bias, "x", x);
    check_size(op, "bias.numel() (= weight.size(0))", bias->numel(), weight.size(0));
  }
}

// int8 weight-only ops: qweight int8, scale floating with one entry per output channel, on x's device.
inline void check_q8_weight(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale) {
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kChar, op, ": qweight must be int8, got ", qweight.scalar_type());
  check_floating(op, "scale", scale);
  check_same_device(op, "qweight", qweight, "x", x);
  check_same_device(op, "scale", scale, "x", x);
}

// x [M, K] floating, qweight [E, N, K] int8 (output rows), scale [E, N].
inline void check_expert_gemm_q8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                 const at::Tensor& expert_offsets, c10::string_view activation) {
  const char* op = "molm::expert_gemm_q8";
  check_rank(op, "x", x, 2);
  check_floating(op, "x", x);
  check_rank(op, "qweight", qweight, 3);
  check_q8_weight(op, x, qweight, scale);
  TORCH_CHECK_VALUE(qweight.size(2) == x.size(1), op, ": qweight [E, N, K] must have K == x.size(1) = ", x.size(1),
                    ", got qweight shape ", qweight.sizes());
  TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) == qweight.size(0) && scale.size(1) == qweight.size(1), op,
                    ": scale must be [E, N] = [", qweight.size(0), ", ", qweight.size(1), "], got ", scale.sizes());
  check_index(op, "expert_offsets", expert_offsets);
  check_same_device(op, "expert_offsets", expert_offsets, "x", x);
  check_size(op, "expert_offsets.numel() (= E + 1)", expert_offsets.numel(), qweight.size(0) + 1);
  TORCH_CHECK_VALUE(activation == "none" || activation == "gelu_new", op,
                    ": activation must be 'none' or 'gelu_new', got '", std::string(activation), "'");
}

// The fused MoE ops (moe_map, moe_reduce, moe_mlp). One expert weight: float [E, K, Nout] of x's dtype (stride(-1)
// == 1 or a transposed view), or int8 [E, Nout, K] (output rows) with scale [E, Nout]. Returns Nout.
inline int64_t check_moe_weight(const char* op, const char* arg, const at::Tensor& x, int64_t in,
                                const at::Tensor& weight, const c10::optional<at::Tensor>& scale) {
  check_rank(op, arg, weight, 3);
  check_same_device(op, arg, weight, "x", x);
  if (scale.has_value()) {
    check_q8_weight(op, x, weight, *scale);
    TORCH_CHECK_VALUE(weight.size(2) == in, op, ": int8 ", arg, " [E, Nout, K] must have K == ", in, ", got shape ",
                      weight.sizes());
    TORCH_CHECK_VALUE(scale->dim() == 2 && scale->size(0) == weight.size(0) && scale->size(1) == weight.size(1), op,
                      ": the scale of ", arg, " must be [E, Nout] = [", weight.size(0), ", ", weight.size(1), "], got ",
                      scale->sizes());
    return weight.size(1);
  }
  check_same_dtype(op, arg, weight, "x", x);
  TORCH_CHECK_VALUE(weight.stride(2) == 1 || weight.stride(1) == 1 || weight.size(2) <= 1 || weight.size(1) <= 1, op,
                    ": ", arg, " must have stride(-1) == 1 or stride(-2) == 1, got strides ", weight.strides());
  TORCH_CHECK_VALUE(weight.size(1) == in, op, ": ", arg, " [E, K, Nout] must have K == ", in, ", got shape ",
                    weight.sizes());
  return weight.size(2);
}

// x [R, K] floating with stride(-1) == 1; sorted_slots and slot_positions [M] int64 (a routing of M slots, see
// route_topk); expert_offsets [E+1]; activation "none" | "gelu_new".
inline void check_moe_routing(const char* op, const at::Tensor& x, const at::Tensor& sorted_slots,
                              const at::Tensor& slot_positions, const at::Tensor& expert_offsets, int64_t m,
                              int64_t n_experts, c10::string_view activation) {
  check_rank(op, "x", x, 2);
  check_floating(op, "x", x);
  check_last_dim_contiguous(op, "x", x);
  const auto check_slots = [&](const char* name, const at::Tensor& t) {
    check_index(op, name, t);
    check_same_device(op, name, t, "x", x);
    TORCH_CHECK_VALUE(t.size(0) == m, op, ": ", name, " must be [M = ", m, "], got shape ", t.sizes());
  };
  check_slots("sorted_slots", sorted_slots);
  check_slots("slot_positions", slot_positions);
  check_index(op, "expert_offsets", expert_offsets);
  check_same_device(op, "expert_offsets", expert_offsets, "x", x);
  check_size(op, "expert_offsets.numel() (= E + 1)", expert_offsets.numel(), n_experts + 1);
  TORCH_CHECK_VALUE(activation == "none" || activation == "gelu_new", op,
                    ": activation must be 'none' or 'gelu_new', got '", std::string(activation), "'");
}

// gates [N, k] floating on x's device.
inline void check_moe_gates(const char* op, const at::Tensor& x, const at::Tensor& gates) {
  check_rank(op, "gates", gates, 2);
  check_floating(op, "gates", gates);
  check_same_device(op, "gates", gates, "x", x);
}

// moe_map: x [N, K], M = N * k slots, out [M, Nout].
inline void check_moe_map(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                          const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                          const at::Tensor& expert_offsets, int64_t k, c10::string_view activation) {
  const char* op = "molm::moe_map";
  TORCH_CHECK_VALUE(k >= 1, op, ": k must be >= 1, got ", k);
  check_rank(op, "x", x, 2);
  check_moe_weight(op, "weight", x, x.size(1), weight, scale);
  check_moe_routing(op, x, sorted_slots, slot_positions, expert_offsets, x.size(0) * k, weight.size(0), activation);
}

// moe_reduce: x [M, K] in slot order, gates [N, k] with N * k == M, out [N, Nout].
inline void check_moe_reduce(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                             const at::Tensor& gates, const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                             const at::Tensor& expert_offsets) {
  const char* op = "molm::moe_reduce";
  check_rank(op, "x", x, 2);
  check_moe_gates(op, x, gates);
  TORCH_CHECK_VALUE(gates.size(0) * gates.size(1) == x.size(0), op, ": gates ", gates.sizes(),
                    " must have N*k == x.size(0) = ", x.size(0));
  check_moe_weight(op, "weight", x, x.size(1), weight, scale);
  check_moe_routing(op, x, sorted_slots, slot_positions, expert_offsets, x.size(0), weight.size(0), "none");
}

// moe_mlp: x [N, C], w1 [E, C, F], w2 [E, F, C] (or their int8 forms), gates [N, k], out [N, C].
inline void check_moe_mlp(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& scale1,
                          const at::Tensor& w2, const c10::optional<at::Tensor>& scale2, const at::Tensor& gates,
                          const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                          const at::Tensor& expert_offsets, c10::string_view activation) {
  const char* op = "molm::moe_mlp";
  check_rank(op, "x", x, 2);
  check_moe_gates(op, x, gates);
  TORCH_CHECK_VALUE(gates.size(0) == x.size(0), op, ": gates must be [N = ", x.size(0), ", k], got ", gates.sizes());
  const int64_t hidden = check_moe_weight(op, "w1", x, x.size(1), w1, scale1);
  const int64_t out = check_moe_weight(op, "w2", x, hidden, w2, scale2);
  TORCH_CHECK_VALUE(out == x.size(1) && w2.size(0) == w1.size(0), op, ": w2 must map the ", hidden,
                    " hidden features of each of the ", w1.size(0), " experts back to x.size(1) = ", x.size(1),
                    ", got w1 ", w1.sizes(), " and w2 ", w2.sizes());
  check_moe_routing(op, x, sorted_slots, slot_positions, expert_offsets, gates.numel(), w1.size(0), activation);
}

// x [M, K] floating, qweight [N, K] int8 (nn.Linear layout), scale [N], bias [N] (x's dtype) or none.
inline void check_linear_q8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const c10::optional<at::Tensor>& bias) {
  const char* op = "molm::linear_q8";
  check_rank(op, "x", x, 2);
  check_floating(op, "x", x);
  check_rank(op, "qweight", qweight, 2);
  check_q8_weight(op, x, qweight, scale);
  TORCH_CHECK_VALUE(qweight.size(1) == x.size(1), op, ": qweight [N, K] must have K == x.size(1) = ", x.size(1),
                    ", got qweight shape ", qweight.sizes());
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == qweight.size(0), op, ": scale must be [N] = [",
                    qweight.size(0), "], got ", scale.sizes());
  if (bias.has_value()) {
    check_rank(op, "bias", *bias, 1);
    check_same_dtype(op, "bias", *bias, "x", x);
    check_same_device(op, "bias", *bias, "x", x);
    check_size(op, "bias.numel() (= qweight.size(0))", bias->numel(), qweight.size(0));
  }
}

// x [M, K], grad_out [M, Nout] (same dtype), offsets [E+1], num_experts == E.
inline void check_expert_gemm_wgrad(const at::Tensor& x, const at::Tensor& grad_out, const at::Tensor& expert_offsets,
                                    int64_t num_experts) {
  const char* op = "molm::expert_gemm_wgrad";
  check_rank(op, "x", x, 2);
  check_floating(op, "x", x);
  check_rank(op, "grad_out", grad_out, 2);
  check_same_dtype(op, "grad_out", grad_out, "x", x);
  check_same_device(op, "grad_out", grad_out, "x", x);
  check_size(op, "grad_out.size(0) (= x.size(0))", grad_out.size(0), x.size(0));
  check_index(op, "expert_offsets", expert_offsets);
  check_same_device(op, "expert_offsets", expert_offsets, "x", x);
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  check_size(op, "expert_offsets.numel() (= num_experts + 1)", expert_offsets.numel(), num_experts + 1);
}

// q [B, T, k, H, D], k/v [B, S, H, D] with T <= S, bias [B, S] floating or None; all stride(-1) == 1.
inline void check_sb_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& bias) {
  const char* op = "molm::sb_attention";
  check_rank(op, "q", q, 5);
  check_floating(op, "q", q);
  check_rank(op, "k", k, 4);
  check_rank(op, "v", v, 4);
  check_same_dtype(op, "k", k, "q", q);
  check_same_dtype(op, "v", v, "q", q);
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k", k);
  check_last_dim_contiguous(op, "v", v);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have the same shape [B, S, H, D], got ", k.sizes(),
                    " and ", v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(2) == q.size(3) && k.size(3) == q.size(4), op,
                    ": k [B, S, H, D] must match q [B, T, k, H, D] in B, H and D, got q ", q.sizes(), " and k ",
                    k.sizes());
  TORCH_CHECK_VALUE(q.size(1) <= k.size(1), op, ": q has T = ", q.size(1), " new positions but k only S = ", k.size(1),
                    " (need T <= S)");
  if (bias.has_value()) {
    const auto& b = *bias;
    check_rank(op, "bias", b, 2);
    check_floating(op, "bias", b);
    check_same_device(op, "bias", b, "q", q);
    TORCH_CHECK_VALUE(b.size(0) == k.size(0) && b.size(1) == k.size(1), op, ": bias must have shape [B, S] = [",
                      k.size(0), ", ", k.size(1), "], got ", b.sizes());
  }
}

}  // namespace molm
