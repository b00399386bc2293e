// Runs the split-KV decode kernels of csrc/cuda/sb_decode.cuh on the CPU emulator (tests/test_sb_decode_emu.py):
// the same kernels and launch plan as the CUDA build, on host buffers (the partial results start NaN-poisoned).
#include <cstdint>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "cuda/sb_decode.cuh"

namespace {
namespace sd = molm::cuda::sb_decode;
std::string g_error;

template <typename scalar_t, typename acc_t>
int run(const void* q, const int64_t* qs, const void* k, const int64_t* ks, const void* v, const int64_t* vs,
        const void* bias, double scale, const int* shape, int sms, void* out) {
  sd::DecodeArgs<scalar_t, acc_t> a{};
  a.B = shape[0], a.T = shape[1], a.G = shape[2], a.H = shape[3], a.D = shape[4], a.S = shape[5];
  const sd::DecodePlan plan = sd::plan(int64_t(a.B) * a.T * a.H, a.G, a.D, a.S, sms, sizeof(acc_t));
  const size_t parts = static_cast<size_t>(int64_t(a.B) * a.T * a.H * a.G * plan.n_chunks);
  std::vector<acc_t> o_part(parts * a.D, std::numeric_limits<acc_t>::quiet_NaN());
  std::vector<acc_t> s_part(parts, std::numeric_limits<acc_t>::quiet_NaN());
  a.q = static_cast<const scalar_t*>(q);
  a.k = static_cast<const scalar_t*>(k);
  a.v = static_cast<const scalar_t*>(v);
  a.bias = static_cast<const acc_t*>(bias);
  a.scale = static_cast<acc_t>(scale);
  a.qs0 = qs[0], a.qs1 = qs[1], a.qs2 = qs[2], a.qs3 = qs[3];
  a.ks0 = ks[0], a.ks1 = ks[1], a.ks2 = ks[2];
  a.vs0 = vs[0], a.vs1 = vs[1], a.vs2 = vs[2];
  a.vec_ok = sd::vec_loads_ok(a);
  a.o_part = o_part.data();
  a.s_part = s_part.data();
  a.out = static_cast<scalar_t*>(out);
  const cudaError_t err = sd::raise_smem_limit<scalar_t, acc_t>(plan);
  if (err != cudaSuccess) {
    g_error = std::to_string(plan.smem) + " bytes of shared memory for the decode kernel: " + cudaGetErrorString(err);
    return -1;
  }
  sd::launch(a, plan, nullptr);
  return static_cast<int>(plan.n_chunks);
}
}  // namespace

extern "C" {

const char* sb_decode_emu_last_error() { return g_error.c_str(); }

// dtype: 0 bf16, 1 fp16, 2 fp32, 3 fp64 (bias in fp64 for fp64, else fp32, or null); shape = {B, T, G, H, D, S};
// strides in elements; sms sets the chunking as the SM count does on a device; the 16-byte load path is taken as the
// CUDA entry point takes it (sb_decode::vec_loads_ok). Returns the number of key chunks, or -1 (message in
// sb_decode_emu_last_error()).
int sb_decode_emu(int dtype, const void* q, const int64_t* qs, const void* k, const int64_t* ks, const void* v,
                  const int64_t* vs, const void* bias, double scale, const int* shape, int sms, void* out) {
  try {
    switch (dtype) {
      case 0: return run<__nv_bfloat16, float>(q, qs, k, ks, v, vs, bias, scale, shape, sms, out);
      case 1: return run<__half, float>(q, qs, k, ks, v, vs, bias, scale, shape, sms, out);
      case 2: return run<float, float>(q, qs, k, ks, v, vs, bias, scale, shape, sms, out);
      case 3: return run<double, double>(q, qs, k, ks, v, vs, bias, scale, shape, sms, out);
      default: g_error = "unknown dtype code " + std::to_string(dtype); return -1;
    }
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
}

}  // extern "C"
