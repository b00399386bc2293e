// Runs the fused prefill kernels of csrc/cuda/sb_prefill.cuh on the CPU emulator (tests/test_sb_prefill_emu.py):
// the same kernel source and the same pass loop (run_passes) as the CUDA build, on host buffers.
#include <cstdint>
#include <algorithm>
#include <exception>
#include <string>
#include <vector>

#include "cuda/sb_prefill.cuh"

namespace {
std::string g_error;

template <typename T16>
int run(const void* q, const int64_t* qs, const void* k, const int64_t* ks, const void* v, const int64_t* vs,
        const float* bias, float scale, float exit_below, const int* shape, int64_t max_smem,
        int64_t max_weights_bytes, void* out, int* first_key_out) {
  namespace sp = molm::cuda::sb_prefill;
  const int B = shape[0], T = shape[1], G = shape[2], H = shape[3], D = shape[4], S = shape[5];
  if (!sp::supports(D)) {
    g_error = "D = " + std::to_string(D) + " is not taken by the fused path";
    return -1;
  }
  const int bd = sp::weights_chunk(D, max_smem);
  if (bd == 0) {
    g_error = "no kernel-1 variant fits " + std::to_string(max_smem) + " bytes of shared memory";
    return -1;
  }
  const int tn_max = sp::pass_positions(B, H, G, S, T, max_weights_bytes);
  // NaN-poisoned (0xFFFF) like an uninitialised device buffer: a weight read before it is written shows up
  std::vector<uint16_t> weights(static_cast<size_t>(sp::weights_elements(B, H, G, S, T, tn_max)), 0xFFFF);
  std::vector<int> first_key(static_cast<size_t>(B * H * sp::row_tiles(G, tn_max)), -1);
  sp::Params<T16> p{};
  p.q = static_cast<const T16*>(q);
  p.k = static_cast<const T16*>(k);
  p.v = static_cast<const T16*>(v);
  p.bias = bias;
  p.weights = reinterpret_cast<T16*>(weights.data());
  p.out = static_cast<T16*>(out);
  p.qs0 = qs[0], p.qs1 = qs[1], p.qs2 = qs[2], p.qs3 = qs[3];
  p.ks0 = ks[0], p.ks1 = ks[1], p.ks2 = ks[2];
  p.vs0 = vs[0], p.vs1 = vs[1], p.vs2 = vs[2];
  p.first_key = first_key.data();
  p.scale = scale;
  p.exit_below = exit_below;
  p.B = B, p.T = T, p.G = G, p.H = H, p.D = D, p.S = S;
  sp::run_passes(p, bd, tn_max, nullptr);
  if (first_key_out != nullptr)  // the last pass's record, for tests of the early exit
    std::copy(first_key.begin(), first_key.end(), first_key_out);
  return tn_max;
}
}  // namespace

extern "C" {

const char* sb_emu_last_error() { return g_error.c_str(); }

// shape = {B, T, G, H, D, S}; q/k/v strides in elements (last dimension contiguous); out [B, T, G, H, D] contiguous;
// first_key_out (B * H * row tiles of the last pass, or null) receives the oldest key kernel 1 walked per row tile.
// Returns the query positions per pass (> 0), or -1 with the message in sb_emu_last_error().
int sb_prefill_forward_emu(int is_bf16, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                           const void* v, const int64_t* vs, const float* bias, float scale, float exit_below,
                           const int* shape, int64_t max_smem, int64_t max_weights_bytes, void* out,
                           int* first_key_out) {
  try {
    return is_bf16 ? run<__nv_bfloat16>(q, qs, k, ks, v, vs, bias, scale, exit_below, shape, max_smem, max_weights_bytes,
                                         out, first_key_out)
                   : run<__half>(q, qs, k, ks, v, vs, bias, scale, exit_below, shape, max_smem, max_weights_bytes, out,
                                 first_key_out);
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
}

}  // extern "C"
