// Entry-point glue shared by the CPU (csrc/cpu/sb_attention.cpp) and CUDA (csrc/cuda/sb_attention.cu) kernels of
// sb_attention: input checks of the backward, its zeroed outputs, and the bias in the accumulation dtype.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "checks.h"

namespace molm {

using SbGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // dq, dk, dv, dbias

// grad_out [B, T, k, H, D] like q; bias_grad needs a bias.
inline void check_sb_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const c10::optional<at::Tensor>& bias, bool bias_grad) {
  check_sb_attention(q, k, v, bias);
  const char* op = "molm::sb_attention_backward";
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), op, ": grad_out must have q's shape ", q.sizes(), ", got ",
                    grad_out.sizes());
  check_same_dtype(op, "grad_out", grad_out, "q", q);
  check_same_device(op, "grad_out", grad_out, "q", q);
  TORCH_CHECK_VALUE(!bias_grad || bias.has_value(), op, ": bias_grad needs a bias");
}

// Zeroed (dq like q, dk like k, dv like v, dbias [B, S] in the accumulation dtype, or [0, 0] without bias_grad).
inline SbGrads sb_zero_grads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool bias_grad) {
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()), at::zeros(v.sizes(), v.options()),
          at::zeros({bias_grad ? k.size(0) : 0, bias_grad ? k.size(1) : 0}, q.options().dtype(acc_dtype))};
}

// The bias [B, S] as a contiguous acc_t tensor (undefined when there is none); keep it alive while its pointer is used.
template <typename acc_t>
at::Tensor sb_bias_as(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->to(c10::CppTypeToScalarType<acc_t>::value).contiguous() : at::Tensor();
}

template <typename acc_t>
const acc_t* sb_bias_ptr(const at::Tensor& bias_acc) {
  return bias_acc.defined() ? bias_acc.data_ptr<acc_t>() : nullptr;
}

}  // namespace molm
