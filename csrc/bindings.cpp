// The Python module `molm._C`. Importing it runs the static initializers that register the molm ops
// (csrc/ops.cpp and the TORCH_LIBRARY_IMPL blocks), which Python then reaches as torch.ops.molm.*. It also reports
// how the extension was built, so a user (and the GPU check) can see which kernel paths exist in this binary.
#include <torch/extension.h>

#include "cpu/vec.h"
#include "kernel_options.h"

#define MOLM_STRINGIFY_(x) #x
#define MOLM_STRINGIFY(x) MOLM_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "molm kernels; the ops are registered as torch.ops.molm.*";
  m.def("cpu_uses_avx2", &molm::cpu::using_avx2, "True when the CPU micro-kernels run their AVX2+FMA bodies");
  m.def(
      "build_info",
      [] {
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
      },
      "How this extension was built: CUDA kernels, their arch list, the sm_90a CUTLASS GEMM");
  m.def(
      "kernel_options",
      [] {
        const molm::KernelOptions& o = molm::kernel_options();
        pybind11::dict d;
        d["sm90_gemm"] = o.sm90_gemm.load();
        d["sb_fused"] = o.sb_fused.load();
        d["sb_fused_backward"] = o.sb_fused_backward.load();
        d["sb_early_exit"] = o.sb_early_exit.load();
        d["value_checks"] = o.value_checks.load();
        return d;
      },
      "The CUDA kernel path choices (see molm.ops.set_kernel_options)");
  m.def(
      "set_kernel_options",
      [](int sm90_gemm, bool sb_fused, bool sb_fused_backward, bool sb_early_exit, bool value_checks) {
        molm::KernelOptions& o = molm::kernel_options();
        o.sm90_gemm.store(sm90_gemm);
        o.sb_fused.store(sb_fused);
        o.sb_fused_backward.store(sb_fused_backward);
        o.sb_early_exit.store(sb_early_exit);
        o.value_checks.store(value_checks);
      },
      pybind11::arg("sm90_gemm"), pybind11::arg("sb_fused"), pybind11::arg("sb_fused_backward"),
      pybind11::arg("sb_early_exit"), pybind11::arg("value_checks"));
}
