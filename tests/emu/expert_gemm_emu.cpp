// Runs the expert GEMM kernels of csrc/cuda/expert_gemm.cuh on the CPU emulator (tests/test_expert_gemm_emu.py): the
// same kernels and path choice (GEMV for few rows, else the WMMA / SIMT tiles; the sm_90 CUTLASS path is not
// emulated) as the CUDA build, on host buffers. The GEMV's partial sums start NaN-poisoned.
#include <cstdint>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "cuda/expert_gemm.cuh"

namespace {
namespace eg = molm::cuda::expert_gemm;
std::string g_error;

// Calls f with a null pointer of the element type of dtype (0 bf16, 1 fp16, 2 fp32, 3 fp64); f's result, or -1 with
// the message in expert_gemm_emu_last_error().
template <typename F>
int with_dtype(int dtype, F&& f) {
  try {
    switch (dtype) {
      case 0: return f(static_cast<__nv_bfloat16*>(nullptr));
      case 1: return f(static_cast<__half*>(nullptr));
      case 2: return f(static_cast<float*>(nullptr));
      case 3: return f(static_cast<double*>(nullptr));
      default: g_error = "unknown dtype code " + std::to_string(dtype); return -1;
    }
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
}
}  // namespace

extern "C" {

const char* expert_gemm_emu_last_error() { return g_error.c_str(); }

// out [m, n_out] = act(x[rows of e] @ w[e]); x [m, kdim] row stride xs0, w [E, kdim, n_out] strides ws*; m, kdim,
// n_out > 0. Returns the path taken: 0 GEMV, 1 tiles; -1 on error.
int expert_gemm_emu(int dtype, const void* x, int64_t xs0, const void* w, const int64_t* ws, const int64_t* offsets,
                    int64_t n_experts, int64_t m, int64_t kdim, int64_t n_out, int gelu, void* out) {
  return with_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const eg::GemmArgs<T> a{static_cast<const T*>(x), xs0, static_cast<const T*>(w), ws[0], ws[1], ws[2], offsets,
                            n_experts, m, kdim, n_out, gelu != 0, static_cast<T*>(out)};
    if (eg::use_gemv(a)) {
      std::vector<float> partial(eg::gemv_workspace_elems(m, kdim, n_out), std::numeric_limits<float>::quiet_NaN());
      eg::launch_gemv(a, partial.data(), nullptr);
      return 0;
    }
    eg::launch_tiles(a, nullptr);
    return 1;
  });
}

// grad_w [E, kdim, n_out] = x[rows of e]^T @ g[rows of e]; x [m, kdim] and g [m, n_out] with strides xs, gs.
int expert_wgrad_emu(int dtype, const void* x, const int64_t* xs, const void* g, const int64_t* gs,
                     const int64_t* offsets, int64_t n_experts, int64_t m, int64_t kdim, int64_t n_out, void* grad_w) {
  return with_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    eg::launch_wgrad(static_cast<const T*>(x), xs[0], xs[1], static_cast<const T*>(g), gs[0], gs[1], offsets,
                     n_experts, m, kdim, n_out, static_cast<T*>(grad_w), nullptr);
    return 0;
  });
}

}  // extern "C"
