// The Python module `molm._C`. Importing it runs the static initializers that register the molm ops
// (csrc/ops.cpp and the TORCH_LIBRARY_IMPL blocks), which Python then reaches as torch.ops.molm.*. It also reports
// how the extension was built, so a user (and the GPU check) can see which kernel paths exist in this binary.
#include <torch/extension.h>

#include "cpu/vec.h"

#define MOLM_STRINGIFY_(x) #x
#define MOLM_STRINGIFY(x) MOLM_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "molm kernels; the ops are registered as torch.ops.molm.*";
  m.def("cpu_uses_avx2", &molm::cpu::using_avx2, "True when the CPU micro-kernels run their AVX2+FMA bodies");
  m.def("build_info", [] {
    pybind11::dict info;
#ifdef MOLM_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
#ifdef MOLM_CUDA_ARCHS
    info["cuda_archs"] = MOLM_STRINGIFY(MOLM_CUDA_ARCHS);  // TORCH_CUDA_ARCH_LIST with separators as '_'
#else
    info["cuda_archs"] = "";
#endif
    // the sm_90a CUTLASS grouped GEMM is compiled in only with a 9.0a target (see setup.py)
#ifdef MOLM_WITH_CUTLASS
    info["cutlass_sm90a"] = true;
#else
    info["cutlass_sm90a"] = false;
#endif
    return info;
  }, "How this extension was built: CUDA kernels, their arch list, the sm_90a CUTLASS GEMM");
}
