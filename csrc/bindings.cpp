// The Python module `molm._C`. It exposes nothing itself: importing it runs the static initializers that register
// the molm ops (csrc/ops.cpp and the TORCH_LIBRARY_IMPL blocks), which Python then reaches as torch.ops.molm.*.
#include <torch/extension.h>

#include "cpu/vec.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "molm kernels; the ops are registered as torch.ops.molm.*";
  m.def("cpu_uses_avx2", &molm::cpu::using_avx2, "True when the CPU micro-kernels run their AVX2+FMA bodies");
}
