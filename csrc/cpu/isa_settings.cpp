// Process-wide CPU kernel settings, registered as torch.ops.molm_cpu.* (no tensors, so outside the molm op
// catalogue of csrc/ops.cpp): which instruction set the micro-kernels of vec.h run. Python: molm.ops.set_cpu_isa.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "vec.h"

namespace molm::cpu {
namespace {

std::string active_isa_name() { return isa_name(active_isa()); }

std::vector<std::string> supported_isa_names() {
  std::vector<std::string> names;
  for (int i = 0; i < kNumIsas; ++i)
    if (isa_supported(static_cast<Isa>(i))) names.emplace_back(isa_name(static_cast<Isa>(i)));
  return names;
}

void set_isa_by_name(const std::string& name) {
  std::string known;
  for (int i = 0; i < kNumIsas; ++i) {
    const Isa isa = static_cast<Isa>(i);
    if (name == isa_name(isa)) return set_active_isa(isa);
    known += (i ? ", '" : "'") + std::string(isa_name(isa)) + "'";
  }
  TORCH_CHECK_VALUE(false, "molm CPU instruction set: unknown name '", name, "' (expected one of ", known, ")");
}

}  // namespace
}  // namespace molm::cpu

TORCH_LIBRARY(molm_cpu, m) {
  m.def("isa() -> str", &molm::cpu::active_isa_name);
  m.def("supported_isas() -> str[]", &molm::cpu::supported_isa_names);
  m.def("set_isa(str name) -> ()", &molm::cpu::set_isa_by_name);
}
