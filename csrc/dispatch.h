// The dtype switch, written once. Every kernel family dispatches through these macros so that the
// supported set (fp32, fp64, bf16, fp16) and the error for anything else are the same everywhere.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

// Runs __VA_ARGS__ (a lambda expression, invoked) with `scalar_t` bound to the C++ type of TYPE.
#define MOLM_DISPATCH_FLOATING(TYPE, OPNAME, ...)                              \
  [&] {                                                                        \
    switch (TYPE) {                                                            \
      case at::kFloat: {                                                       \
        using scalar_t = float;                                                \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case at::kDouble: {                                                      \
        using scalar_t = double;                                               \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case at::kBFloat16: {                                                    \
        using scalar_t = c10::BFloat16;                                        \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case at::kHalf: {                                                        \
        using scalar_t = c10::Half;                                            \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      default:                                                                 \
        TORCH_CHECK_TYPE(false, OPNAME, ": unsupported dtype ", TYPE,          \
                         " (expected float32, float64, bfloat16 or float16)"); \
    }                                                                          \
  }()

namespace molm {
// Accumulation type: float for fp32/bf16/fp16, double for fp64.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;
}  // namespace molm
