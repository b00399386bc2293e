#include "gemm.h"

#include "vec.h"

namespace molm::cpu {

// The active set, not just cpuid: with set_cpu_isa("avx2") the upcast path runs here too (tests cover both).
bool native_bf16_gemm() { return active_isa() == Isa::kAvx512Bf16; }

}  // namespace molm::cpu
