// at::mm for the CPU ops' larger row counts (prefill, training), in the fastest form for this CPU.
// bf16: oneDNN's bf16 GEMM where the CPU has AVX512-BF16 (measured on 2 AMD EPYC cores, [M, 1024] @ [1024, 2048],
// M = 64..2048: 4-6x faster than upcasting to fp32; its rows do not depend on M, like MKL's fp32 GEMM). Without
// it ATen's bf16 and fp16 GEMMs are scalar loops (on 2 AVX2 cores, [64, 1024] @ [1024, 2048]: 666 ms in bf16 vs
// 3.5 ms upcast), so 16-bit inputs are upcast to fp32 there, and fp16 always.
#pragma once

#include <ATen/ATen.h>

namespace molm::cpu {

bool native_bf16_gemm();  // the active instruction set (molm.ops.set_cpu_isa) is avx512_bf16

// dst = a @ b (dst may be a contiguous view: a segment of the op's output)
inline void mm_into(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b) {
  const auto dtype = dst.scalar_type();
  if (dtype == at::kFloat || dtype == at::kDouble || (dtype == at::kBFloat16 && native_bf16_gemm())) {
    at::mm_out(dst, a, b);
  } else {
    dst.copy_(at::mm(a.to(at::kFloat), b.to(at::kFloat)));
  }
}

}  // namespace molm::cpu
