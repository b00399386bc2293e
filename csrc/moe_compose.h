// The fused MoE ops written as compositions of the grouped-GEMM ops (gather_rows -> expert_gemm or expert_gemm_q8
// -> gather_rows / scatter_ksum), called through the dispatcher so the same code serves every device: the CUDA
// implementation, and the CPU one for routings its fused kernels do not take (expert segments too large for a
// GEMV: prefill, training). Inputs are validated by the caller (checks.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>

namespace molm {

inline at::Tensor call_gather_rows(const at::Tensor& x, const at::Tensor& index, int64_t group) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("molm::gather_rows", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(x, index, group);
}

inline at::Tensor call_scatter_ksum(const at::Tensor& y, const at::Tensor& gates, const at::Tensor& slot_positions) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("molm::scatter_ksum", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(y, gates, slot_positions);
}

// expert_gemm (float weight [E, K, Nout]) or expert_gemm_q8 (int8 weight [E, Nout, K] with scale [E, Nout])
inline at::Tensor call_expert_projection(const at::Tensor& x, const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& scale, const at::Tensor& expert_offsets,
                                         c10::string_view activation) {
  if (scale.has_value()) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("molm::expert_gemm_q8", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, c10::string_view)>();
    return op.call(x, weight, *scale, expert_offsets, activation);
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("molm::expert_gemm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view)>();
  return op.call(x, weight, expert_offsets, activation);
}

inline at::Tensor moe_map_composed(const at::Tensor& x, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& scale, const at::Tensor& sorted_slots,
                                   const at::Tensor& slot_positions, const at::Tensor& expert_offsets, int64_t k,
                                   c10::string_view activation) {
  const at::Tensor y = call_expert_projection(call_gather_rows(x, sorted_slots, k), weight, scale, expert_offsets,
                                              activation);  // [M, Nout] expert order
  return call_gather_rows(y, slot_positions, 1);            // slot order
}

inline at::Tensor moe_reduce_composed(const at::Tensor& x, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& scale, const at::Tensor& gates,
                                      const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                                      const at::Tensor& expert_offsets) {
  const at::Tensor y =
      call_expert_projection(call_gather_rows(x, sorted_slots, 1), weight, scale, expert_offsets, "none");
  return call_scatter_ksum(y, gates, slot_positions);
}

inline at::Tensor moe_mlp_composed(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& scale1,
                                   const at::Tensor& w2, const c10::optional<at::Tensor>& scale2,
                                   const at::Tensor& gates, const at::Tensor& sorted_slots,
                                   const at::Tensor& slot_positions, const at::Tensor& expert_offsets,
                                   c10::string_view activation) {
  const at::Tensor h = call_expert_projection(call_gather_rows(x, sorted_slots, gates.size(1)), w1, scale1,
                                              expert_offsets, activation);  // [M, F] expert order
  return call_scatter_ksum(call_expert_projection(h, w2, scale2, expert_offsets, "none"), gates, slot_positions);
}

}  // namespace molm
