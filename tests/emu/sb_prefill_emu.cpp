// Runs the fused prefill kernels of csrc/cuda/sb_prefill.cuh on the CPU emulator (tests/test_sb_prefill_emu.py):
// the same kernel source and the same pass loops (run_passes, run_backward_passes) as the CUDA build, on host
// buffers. Buffers the CUDA build takes from at::empty start NaN-poisoned here, so reading one before it is written
// shows up in the outputs.
#include <algorithm>
#include <cstdint>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "cuda/sb_prefill.cuh"

namespace {
namespace sp = molm::cuda::sb_prefill;
std::string g_error;

// Inputs shared by the forward and backward entry points. shape = {B, T, G, H, D, S}; strides in elements.
struct Inputs {
  const void *q, *k, *v;
  const int64_t *qs, *ks, *vs;
  const float* bias;
  float scale;
  const int* shape;
  int64_t max_smem, max_pass_bytes;
};

// The CUDA entry point's checks (sb_prefill::takes), the kernel-1 variant and its shared-memory opt-in; grad_out and
// gs for the backward, else null.
template <typename T16>
bool setup(const Inputs& in, sp::Params<T16>& p, int& bd, const void* grad_out = nullptr, const int64_t* gs = nullptr) {
  p = sp::Params<T16>{};
  p.B = in.shape[0], p.T = in.shape[1], p.G = in.shape[2], p.H = in.shape[3], p.D = in.shape[4], p.S = in.shape[5];
  p.q = static_cast<const T16*>(in.q);
  p.k = static_cast<const T16*>(in.k);
  p.v = static_cast<const T16*>(in.v);
  p.bias = in.bias;
  p.qs0 = in.qs[0], p.qs1 = in.qs[1], p.qs2 = in.qs[2], p.qs3 = in.qs[3];
  p.ks0 = in.ks[0], p.ks1 = in.ks[1], p.ks2 = in.ks[2];
  p.vs0 = in.vs[0], p.vs1 = in.vs[1], p.vs2 = in.vs[2];
  p.scale = in.scale;
  p.out_scale = 1.f;
  if (!sp::takes(p, static_cast<const T16*>(grad_out), gs)) {
    g_error = "not taken by the fused path: D = " + std::to_string(p.D) +
              " (a multiple of 128 up to 1024), rows 16-byte aligned, grids within limits";
    return false;
  }
  bd = sp::weights_chunk(p.D, in.max_smem);
  if (bd == 0) {
    g_error = "no kernel-1 variant fits " + std::to_string(in.max_smem) + " bytes of shared memory";
    return false;
  }
  const cudaError_t err = sp::raise_weights_smem_limit<T16>(bd, in.max_smem);
  if (err != cudaSuccess) {
    g_error = std::string("raising kernel 1's shared-memory limit: ") + cudaGetErrorString(err);
    return false;
  }
  return true;
}

constexpr uint16_t kNan16 = 0xFFFF;  // a NaN in both bf16 and fp16

// A buffer filled with `fill` whose data is 256-byte aligned like a CUDA allocation (WMMA stores need 32 bytes).
template <typename T>
struct DeviceLikeBuffer {
  std::vector<T> storage;
  T* data;
  DeviceLikeBuffer(size_t n, T fill) : storage(n + 256 / sizeof(T), fill) {
    const auto addr = reinterpret_cast<uintptr_t>(storage.data());
    data = storage.data() + ((256 - addr % 256) % 256) / sizeof(T);
  }
};

template <typename T16>
int forward(const Inputs& in, float exit_below, void* out, int* first_key_out) {
  sp::Params<T16> p;
  int bd = 0;
  if (!setup(in, p, bd)) return -1;
  const int tn_max = sp::pass_positions(p.B, p.H, p.G, p.S, p.T, in.max_pass_bytes);
  DeviceLikeBuffer<uint16_t> weights(static_cast<size_t>(sp::weights_elements(p.B, p.H, p.G, p.S, p.T, tn_max)),
                                     kNan16);
  std::vector<int> first_key(static_cast<size_t>(p.B * p.H * sp::row_tiles(p.G, tn_max)), -1);
  p.weights = reinterpret_cast<T16*>(weights.data);
  p.first_key = first_key.data();
  p.out = static_cast<T16*>(out);
  p.exit_below = exit_below;
  sp::run_passes(p, bd, tn_max, nullptr);
  if (first_key_out != nullptr)  // the last pass's record, for tests of the early exit
    std::copy(first_key.begin(), first_key.end(), first_key_out);
  return tn_max;
}

template <typename T16>
int backward(const Inputs& in, const void* grad_out, const int64_t* gs, void* dq, float* dk_acc, float* dv_acc,
             float* dbias) {
  sp::Params<T16> p;
  int bd = 0;
  if (!setup(in, p, bd, grad_out, gs)) return -1;
  const int tn_max = sp::pass_positions(p.B, p.H, p.G, p.S, p.T, in.max_pass_bytes, 12);
  const size_t n = static_cast<size_t>(sp::weights_elements(p.B, p.H, p.G, p.S, p.T, tn_max));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  DeviceLikeBuffer<float> scores(n, nan), grads(n, nan);
  DeviceLikeBuffer<uint16_t> weights(n, kNan16), dlogits(n, kNan16);
  const sp::BackwardBuffers<T16> buf{scores.data, grads.data, reinterpret_cast<T16*>(weights.data),
                                     reinterpret_cast<T16*>(dlogits.data), dk_acc, dv_acc, dbias};
  const int64_t strides[4] = {gs[0], gs[1], gs[2], gs[3]};
  sp::run_backward_passes(p, static_cast<const T16*>(grad_out), strides, static_cast<T16*>(dq), buf, bd, tn_max,
                          nullptr);
  return tn_max;
}

template <typename F>
int guarded(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
}
}  // namespace

extern "C" {

const char* sb_emu_last_error() { return g_error.c_str(); }

// q [B, T, G, H, D], k/v [B, S, H, D] with strides qs (4), ks, vs (3) in elements, last dimension contiguous;
// shape = {B, T, G, H, D, S}; out [B, T, G, H, D] contiguous; first_key_out (B * H * row tiles of the last pass, or
// null) receives the oldest key kernel 1 walked per row tile. Returns the query positions per pass (> 0), or -1
// with the message in sb_emu_last_error().
int sb_prefill_forward_emu(int is_bf16, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                           const void* v, const int64_t* vs, const float* bias, float scale, float exit_below,
                           const int* shape, int64_t max_smem, int64_t max_pass_bytes, void* out,
                           int* first_key_out) {
  const Inputs in{q, k, v, qs, ks, vs, bias, scale, shape, max_smem, max_pass_bytes};
  return guarded([&] {
    return is_bf16 ? forward<__nv_bfloat16>(in, exit_below, out, first_key_out)
                   : forward<__half>(in, exit_below, out, first_key_out);
  });
}

// The backward: grad_out like q (strides gs, 4); dq [B, T, G, H, D] contiguous (16-bit, fully written);
// dk_acc / dv_acc [B * H, S, D] fp32 and dbias [B, S] fp32 (or null) zeroed by the caller and accumulated into.
int sb_prefill_backward_emu(int is_bf16, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                            const void* v, const int64_t* vs, const float* bias, float scale, const int* shape,
                            int64_t max_smem, int64_t max_pass_bytes, const void* grad_out, const int64_t* gs,
                            void* dq, float* dk_acc, float* dv_acc, float* dbias) {
  const Inputs in{q, k, v, qs, ks, vs, bias, scale, shape, max_smem, max_pass_bytes};
  return guarded([&] {
    return is_bf16 ? backward<__nv_bfloat16>(in, grad_out, gs, dq, dk_acc, dv_acc, dbias)
                   : backward<__half>(in, grad_out, gs, dq, dk_acc, dv_acc, dbias);
  });
}

}  // extern "C"
