// The Python module `molm._C`. Importing it runs the static initializers that register the molm ops
// (csrc/ops.cpp and the TORCH_LIBRARY_IMPL blocks), which Python then reaches as torch.ops.molm.*. It also reports
// how the extension was built, so a user (and the GPU check) can see which kernel paths exist in this binary, and
// the decode plan's C++ step (decode_runner.h).
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "cpu/vec.h"
#include "decode_runner.h"
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

  using OptTensor = std::optional<at::Tensor>;
  using Linear = std::pair<at::Tensor, OptTensor>;  // (weight, bias)
  const auto planned = [](const Linear& l) { return molm::PlannedLinear{l.first, l.second}; };
  pybind11::class_<molm::DecodeRunner>(m, "DecodeRunner", "The trunk of a DecodePlan step (molm/engine.py) in C++")
      .def(pybind11::init<>())
      .def(
          "add_block",
          [planned](molm::DecodeRunner& runner, std::vector<int64_t> norm_shape, at::Tensor ln1_weight,
                    OptTensor ln1_bias, double ln1_eps, at::Tensor ln2_weight, OptTensor ln2_bias, double ln2_eps,
                    std::vector<Linear> att_router, int64_t att_k, at::Tensor att_in, OptTensor att_in_scale,
                    at::Tensor att_out, OptTensor att_out_scale, int64_t heads, int64_t head_size, double scale,
                    std::optional<Linear> k_proj, std::optional<Linear> v_proj, std::vector<Linear> mlp_router,
                    int64_t mlp_k, at::Tensor mlp_in, OptTensor mlp_in_scale, at::Tensor mlp_out,
                    OptTensor mlp_out_scale) {
            molm::PlannedBlock b;
            b.norm_shape = std::move(norm_shape);
            b.ln1_weight = ln1_weight;
            b.ln1_bias = ln1_bias;
            b.ln1_eps = ln1_eps;
            b.ln2_weight = ln2_weight;
            b.ln2_bias = ln2_bias;
            b.ln2_eps = ln2_eps;
            for (const Linear& l : att_router) b.att_router.push_back(planned(l));
            for (const Linear& l : mlp_router) b.mlp_router.push_back(planned(l));
            TORCH_CHECK_VALUE(
                !b.att_router.empty() && b.att_router.size() <= 2 && !b.mlp_router.empty() && b.mlp_router.size() <= 2,
                "DecodeRunner.add_block: a router is one or two linear maps");
            TORCH_CHECK_VALUE(k_proj.has_value() == v_proj.has_value(),
                              "DecodeRunner.add_block: give both K and V projections or neither");
            b.att_k = att_k;
            b.mlp_k = mlp_k;
            b.att_in = att_in;
            b.att_in_scale = att_in_scale;
            b.att_out = att_out;
            b.att_out_scale = att_out_scale;
            b.mlp_in = mlp_in;
            b.mlp_in_scale = mlp_in_scale;
            b.mlp_out = mlp_out;
            b.mlp_out_scale = mlp_out_scale;
            b.heads = heads;
            b.head_size = head_size;
            b.scale = scale;
            if (k_proj.has_value()) {
              b.k_proj = planned(*k_proj);
              b.v_proj = planned(*v_proj);
            }
            runner.add_block(std::move(b));
          },
          pybind11::kw_only(), pybind11::arg("norm_shape"), pybind11::arg("ln1_weight"), pybind11::arg("ln1_bias"),
          pybind11::arg("ln1_eps"), pybind11::arg("ln2_weight"), pybind11::arg("ln2_bias"), pybind11::arg("ln2_eps"),
          pybind11::arg("att_router"), pybind11::arg("att_k"), pybind11::arg("att_in"), pybind11::arg("att_in_scale"),
          pybind11::arg("att_out"), pybind11::arg("att_out_scale"), pybind11::arg("heads"), pybind11::arg("head_size"),
          pybind11::arg("scale"), pybind11::arg("k_proj"), pybind11::arg("v_proj"), pybind11::arg("mlp_router"),
          pybind11::arg("mlp_k"), pybind11::arg("mlp_in"), pybind11::arg("mlp_in_scale"), pybind11::arg("mlp_out"),
          pybind11::arg("mlp_out_scale"))
      .def("run", &molm::DecodeRunner::run, pybind11::arg("x"), pybind11::arg("bias"), pybind11::arg("keys"),
           pybind11::arg("values"), pybind11::arg("positions"), pybind11::arg("length"),
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
