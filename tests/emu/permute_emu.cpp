// Runs the gather / scatter kernels of csrc/cuda/permute.cuh on the CPU emulator (tests/test_permute_emu.py): the
// same kernels and launch decisions (16-byte vectors or single elements) as the CUDA build, on host buffers.
#include <cstdint>
#include <exception>
#include <string>

#include "cuda/permute.cuh"

namespace {
namespace pm = molm::cuda::permute;
std::string g_error;

// Calls f with a null pointer of the element type of dtype (0 bf16, 1 fp16, 2 fp32, 3 fp64); 0, or -1 with the
// message in permute_emu_last_error().
template <typename F>
int with_dtype(int dtype, F&& f) {
  try {
    switch (dtype) {
      case 0: f(static_cast<__nv_bfloat16*>(nullptr)); return 0;
      case 1: f(static_cast<__half*>(nullptr)); return 0;
      case 2: f(static_cast<float*>(nullptr)); return 0;
      case 3: f(static_cast<double*>(nullptr)); return 0;
      default: g_error = "unknown dtype code " + std::to_string(dtype); return -1;
    }
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
}
}  // namespace

extern "C" {

const char* permute_emu_last_error() { return g_error.c_str(); }

// out [m, width] = x[index / group]; x [n_rows, width] with row stride xs0 (elements).
int gather_rows_emu(int dtype, const void* x, int64_t xs0, const int64_t* index, int64_t m, int64_t group,
                    int64_t n_rows, int64_t width, void* out) {
  return with_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pm::launch_gather<T>(static_cast<const T*>(x), xs0, index, m, group, n_rows, width, static_cast<T*>(out), nullptr);
  });
}

// out [n_tokens, width] = sum_j gates[n, j] * y[pos[n * k + j]]; gates in fp32 (fp64 for fp64).
int scatter_ksum_emu(int dtype, const void* y, int64_t ys0, const void* gates, const int64_t* pos, int64_t n_tokens,
                     int64_t k, int64_t m, int64_t width, void* out) {
  return with_dtype(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    pm::launch_scatter_ksum<T>(static_cast<const T*>(y), ys0, static_cast<const molm::cuda::dev_acc_t<T>*>(gates), pos,
                               n_tokens, k, m, width, static_cast<T*>(out), nullptr);
  });
}

}  // extern "C"
