// CUDA stick-breaking attention (ModuleFormer variant; math in csrc/cpu/core/sb_core.h, oracle sb_attention_ref):
// the entry points, which choose a path and allocate its buffers.
//  * decode (T <= kDecodeMaxQueries): split-KV (sb_decode.cuh), capturable in a CUDA graph.
//  * prefill and backward, 16-bit, D a multiple of 128 up to 1024: the fused tensor-core kernels of sb_prefill.cuh
//    (scores + scan from the diagonal back, then A V over the causal range; the backward on the same tiles).
//    molm.ops.set_kernel_options(sb_fused=False) turns them off.
//  * otherwise: tiles of query positions batched over (b, h). The two products with K and V run as cuBLAS batched
//    GEMMs (tensor cores for bf16/fp16, fp32 output); a warp-per-row kernel (sb_scan.cuh) does the reverse scan
//    (forward) or the two-pass gradient scan (backward) in place. dK/dV are summed over query tiles in a fixed
//    order into fp32 buffers.
// No atomics anywhere: results are bitwise repeatable.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <tuple>

#include "../checks.h"
#include "../sb_attention_common.h"
#include "../dispatch.h"
#include "common.cuh"
#include "sb_decode.cuh"
#include "sb_prefill.cuh"
#include "sb_scan.cuh"

namespace molm::cuda {
namespace {

using namespace sb;
using sb_decode::kDecodeMaxQueries;

constexpr int64_t kTileBytes = 256 << 20;  // fp32 score buffer per tile of query positions (prefill, backward)

// ------------------------------------------------------------------------------------------------ host side

template <typename scalar_t>
constexpr bool is_16bit() {
  return std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;
}

// Batched a @ b^T-style products with acc_t output: 16-bit inputs give fp32 through cuBLAS's fp32-output GEMM.
template <typename scalar_t>
at::Tensor bmm_acc(const at::Tensor& a, const at::Tensor& b) {
  if constexpr (is_16bit<scalar_t>())
    return at::bmm(a, b, at::kFloat);
  else
    return at::bmm(a, b);
}

// [B, S, H, D] -> [B*H, W, D] (keys 0 .. W-1); a view when H == 1.
at::Tensor keys_bh(const at::Tensor& k, int64_t W) {
  const int64_t B = k.size(0), H = k.size(2), D = k.size(3);
  return k.narrow(1, 0, W).permute({0, 2, 1, 3}).reshape({B * H, W, D});
}

// [B, T, G, H, D] narrowed to positions [t0, t0+tn) -> [B*H, tn*G, D] (a copy)
at::Tensor queries_bh(const at::Tensor& q, int64_t t0, int64_t tn) {
  const int64_t B = q.size(0), G = q.size(2), H = q.size(3), D = q.size(4);
  return q.narrow(1, t0, tn).permute({0, 3, 1, 2, 4}).reshape({B * H, tn * G, D});
}

// inverse of queries_bh: write x [B*H, tn*G, D] into dst [B, T, G, H, D] at positions [t0, t0+tn)
void store_bh(at::Tensor& dst, const at::Tensor& x, int64_t t0, int64_t tn) {
  const int64_t B = dst.size(0), G = dst.size(2), H = dst.size(3), D = dst.size(4);
  dst.narrow(1, t0, tn).permute({0, 3, 1, 2, 4}).copy_(x.view({B, H, tn, G, D}));
}

// positions per tile so that one [B*H, tile*G, S] acc_t buffer stays under kTileBytes
int64_t tile_positions(int64_t B, int64_t H, int64_t G, int64_t S, int64_t T, int64_t elem) {
  const int64_t per_pos = std::max<int64_t>(1, B * H * G * S * elem);
  int64_t tile = std::max<int64_t>(1, kTileBytes / per_pos);
  if (tile >= 64) tile = tile / 64 * 64;
  return std::min(tile, T);
}

template <typename acc_t>
void launch_scan_forward(at::Tensor& w, int64_t rows, int64_t width, int64_t G, int64_t H, int64_t pos0, int64_t S,
                         const acc_t* bias, acc_t scale) {
  const int64_t n_rows = w.size(0) * rows;
  const int64_t blocks = ceil_div(n_rows, kScanWarps);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "molm::sb_attention: too many rows for one launch");
  sb_scan_forward_kernel<acc_t><<<blocks, kScanWarps * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
      w.data_ptr<acc_t>(), n_rows, rows, rows, width, G, H, pos0, S, bias, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void sb_forward_tiled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const acc_type<scalar_t>* bias,
                      double scale, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = q.size(0), T = q.size(1), G = q.size(2), H = q.size(3), S = k.size(1);
  const int64_t tile = tile_positions(B, H, G, S, T, sizeof(acc_t));
  for (int64_t t0 = 0; t0 < T; t0 += tile) {
    const int64_t tn = std::min(tile, T - t0), rows = tn * G, width = S - T + t0 + tn;
    const at::Tensor kw = keys_bh(k, width), vw = keys_bh(v, width);
    at::Tensor w = bmm_acc<scalar_t>(queries_bh(q, t0, tn), kw.transpose(1, 2));  // [B*H, rows, W]
    launch_scan_forward<acc_t>(w, rows, width, G, H, S - T + t0, S, bias, static_cast<acc_t>(scale));
    store_bh(out, at::bmm(w.to(q.scalar_type()), vw), t0, tn);
  }
}

bool fused_prefill_enabled() { return kernel_options().sb_fused.load(std::memory_order_relaxed); }
bool fused_backward_enabled() { return kernel_options().sb_fused_backward.load(std::memory_order_relaxed); }

// Log-survival below which the fused prefill stops walking keys: -30 (the stick left is < 1e-13), or never with
// set_kernel_options(sb_early_exit=False).
float early_exit_below() {
  return kernel_options().sb_early_exit.load(std::memory_order_relaxed) ? -30.f
                                                                        : -std::numeric_limits<float>::infinity();
}

// Kernel 1's dynamic shared-memory limit, raised once per device (sb_prefill::raise_weights_smem_limit): a host call
// that must not run again during graph capture.
template <typename T16>
void raise_smem_limits(int bd) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> raised[2][kMaxDevices] = {};
  const int device = at::cuda::current_device();
  auto& flag = raised[bd == 64 ? 0 : 1][device % kMaxDevices];
  if (device < kMaxDevices && flag.load()) return;
  C10_CUDA_CHECK(
      sb_prefill::raise_weights_smem_limit<T16>(bd, at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin));
  flag.store(true);
}

// Checks and common parameters of the fused kernels (sb_prefill.cuh). Returns false, having done nothing, for inputs
// they do not take (sb_prefill::takes: head size, 16-byte aligned rows, grid limits) or a device without the shared
// memory. Raises kernel 1's shared-memory limit.
template <typename T16>
bool fused_setup(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* grad_out,
                 const float* bias, double scale, sb_prefill::Params<T16>& p, int& bd) {
  namespace sp = sb_prefill;
  if (!(grad_out != nullptr ? fused_backward_enabled() : fused_prefill_enabled())) return false;
  p = sp::Params<T16>{};
  p.q = reinterpret_cast<const T16*>(q.data_ptr());
  p.k = reinterpret_cast<const T16*>(k.data_ptr());
  p.v = reinterpret_cast<const T16*>(v.data_ptr());
  p.bias = bias;
  p.qs0 = q.stride(0), p.qs1 = q.stride(1), p.qs2 = q.stride(2), p.qs3 = q.stride(3);
  p.ks0 = k.stride(0), p.ks1 = k.stride(1), p.ks2 = k.stride(2);
  p.vs0 = v.stride(0), p.vs1 = v.stride(1), p.vs2 = v.stride(2);
  p.scale = static_cast<float>(scale);
  p.exit_below = early_exit_below();
  p.out_scale = 1.f;
  p.B = q.size(0), p.T = q.size(1), p.G = q.size(2), p.H = q.size(3), p.D = q.size(4), p.S = k.size(1);
  if (grad_out) {
    const int64_t gs[4] = {grad_out->stride(0), grad_out->stride(1), grad_out->stride(2), grad_out->stride(3)};
    if (!sp::takes(p, reinterpret_cast<const T16*>(grad_out->data_ptr()), gs)) return false;
  } else if (!sp::takes<T16>(p, nullptr, nullptr)) {
    return false;
  }
  bd = sp::weights_chunk(p.D, at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  if (bd == 0) return false;
  raise_smem_limits<T16>(bd);
  return true;
}

// The fused tensor-core prefill; false when fused_setup refuses (the caller takes the cuBLAS-tiled path).
template <typename scalar_t>
bool sb_forward_fused(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const acc_type<scalar_t>* bias,
                      double scale, at::Tensor& out) {
  if constexpr (!is_16bit<scalar_t>()) {
    return false;
  } else {
    namespace sp = sb_prefill;
    using T16 = device_t<scalar_t>;
    sp::Params<T16> p;
    int bd = 0;
    if (!fused_setup<T16>(q, k, v, nullptr, bias, scale, p, bd)) return false;
    const int64_t tn_max = sp::pass_positions(p.B, p.H, p.G, p.S, p.T, kTileBytes);
    at::Tensor weights = at::empty({sp::weights_elements(p.B, p.H, p.G, p.S, p.T, tn_max)}, q.options());
    at::Tensor first_key = at::empty({p.B * p.H * sp::row_tiles(p.G, tn_max)}, q.options().dtype(at::kInt));
    p.weights = reinterpret_cast<T16*>(weights.data_ptr());
    p.first_key = first_key.data_ptr<int>();
    p.out = reinterpret_cast<T16*>(out.data_ptr());
    sp::run_passes(p, bd, static_cast<int>(tn_max), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
}

// The fused backward (causal tensor-core products, sb_prefill.cuh); false when fused_setup refuses.
template <typename scalar_t>
bool sb_backward_fused(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const acc_type<scalar_t>* bias, double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                       at::Tensor& dbias) {
  if constexpr (!is_16bit<scalar_t>()) {
    return false;
  } else {
    namespace sp = sb_prefill;
    using T16 = device_t<scalar_t>;
    sp::Params<T16> p;
    int bd = 0;
    if (!fused_setup<T16>(q, k, v, &grad, bias, scale, p, bd)) return false;
    const int64_t B = p.B, H = p.H, S = p.S, D = p.D;
    const int64_t tn_max = sp::pass_positions(B, H, p.G, S, p.T, kTileBytes, 12);
    const int64_t n = sp::weights_elements(B, H, p.G, S, p.T, tn_max);
    const auto f32 = q.options().dtype(at::kFloat);
    at::Tensor scores = at::empty({n}, f32), grads = at::empty({n}, f32);
    at::Tensor weights = at::empty({n}, q.options()), dlogits = at::empty({n}, q.options());
    at::Tensor dk_acc = at::zeros({B * H, S, D}, f32), dv_acc = at::zeros({B * H, S, D}, f32);
    const sp::BackwardBuffers<T16> buf{scores.data_ptr<float>(),
                                       grads.data_ptr<float>(),
                                       reinterpret_cast<T16*>(weights.data_ptr()),
                                       reinterpret_cast<T16*>(dlogits.data_ptr()),
                                       dk_acc.data_ptr<float>(),
                                       dv_acc.data_ptr<float>(),
                                       dbias.numel() > 0 ? dbias.data_ptr<float>() : nullptr};
    const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
    sp::run_backward_passes(p, reinterpret_cast<const T16*>(grad.data_ptr()), gs, reinterpret_cast<T16*>(dq.data_ptr()),
                            buf, bd, static_cast<int>(tn_max), at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dk.permute({0, 2, 1, 3}).copy_(dk_acc.view({B, H, S, D}));
    dv.permute({0, 2, 1, 3}).copy_(dv_acc.view({B, H, S, D}));
    return true;
  }
}

// Returns false, having done nothing, when the grids would exceed CUDA's limits (chunks on grid y, more than
// about 33.5 M keys; query rows x slots on grid x of the combine kernel): the tiled path takes those.
template <typename scalar_t>
bool sb_forward_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const acc_type<scalar_t>* bias,
                       double scale, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  using dev_t = device_t<scalar_t>;
  const int64_t B = q.size(0), T = q.size(1), G = q.size(2), H = q.size(3), D = q.size(4), S = k.size(1);
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const sb_decode::DecodePlan plan =
      sb_decode::plan(B * T * H, G, D, S, props->multiProcessorCount, static_cast<int64_t>(sizeof(acc_t)));
  if (plan.n_chunks > kMaxGridYZ || B * T * H * G > kMaxGridX) return false;
  TORCH_CHECK(plan.smem <= static_cast<int64_t>(props->sharedMemPerBlockOptin), "molm::sb_attention: k = ", G,
              " slots of D = ", D, " need ", plan.smem,
              " bytes of shared memory in the decode kernel, the device allows ", props->sharedMemPerBlockOptin);
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor o_part = at::empty({B * T * H * G * plan.n_chunks, D}, acc_opts);
  at::Tensor s_part = at::empty({B * T * H * G * plan.n_chunks}, acc_opts);
  C10_CUDA_CHECK((sb_decode::raise_smem_limit<dev_t, acc_t>(plan)));
  sb_decode::DecodeArgs<dev_t, acc_t> a{};
  a.q = reinterpret_cast<const dev_t*>(q.data_ptr());
  a.k = reinterpret_cast<const dev_t*>(k.data_ptr());
  a.v = reinterpret_cast<const dev_t*>(v.data_ptr());
  a.bias = bias;
  a.scale = static_cast<acc_t>(scale);
  a.B = B, a.T = T, a.G = G, a.H = H, a.D = D, a.S = S;
  a.qs0 = q.stride(0), a.qs1 = q.stride(1), a.qs2 = q.stride(2), a.qs3 = q.stride(3);
  a.ks0 = k.stride(0), a.ks1 = k.stride(1), a.ks2 = k.stride(2);
  a.vs0 = v.stride(0), a.vs1 = v.stride(1), a.vs2 = v.stride(2);
  a.vec_ok = sb_decode::vec_loads_ok(a);
  a.o_part = o_part.data_ptr<acc_t>();
  a.s_part = s_part.data_ptr<acc_t>();
  a.out = reinterpret_cast<dev_t*>(out.data_ptr());
  sb_decode::launch(a, plan, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

void check_int_sizes(const at::Tensor& q, const at::Tensor& k) {
  const int64_t lim = std::numeric_limits<int>::max() / 2;
  TORCH_CHECK_VALUE(k.size(1) < lim && q.size(2) * q.size(4) < lim, "molm::sb_attention: sizes too large, q ",
                    q.sizes(), ", k ", k.sizes());
}

at::Tensor sb_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const c10::optional<at::Tensor>& bias, double scale) {
  check_sb_attention(q, k, v, bias);
  check_int_sizes(q, k);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous [B, T, k, H, D]
  if (out.numel() == 0) return out;
  MOLM_DISPATCH_FLOATING(q.scalar_type(), "molm::sb_attention", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor bias_acc = sb_bias_as<acc_t>(bias);  // [B, S] in the accumulation dtype
    const acc_t* bp = sb_bias_ptr<acc_t>(bias_acc);
    if (q.size(1) <= kDecodeMaxQueries && sb_forward_decode<scalar_t>(q, k, v, bp, scale, out)) return;
    if (sb_forward_fused<scalar_t>(q, k, v, bp, scale, out)) return;
    sb_forward_tiled<scalar_t>(q, k, v, bp, scale, out);
  });
  return out;
}

// Backward: per tile of query positions (batched over b, h), w = Q K^T and g = dO V^T (acc_t), the gradient scan in
// place (w -> A, g -> dl), then dQ = scale dl K, and dK += scale dl^T Q, dV += A^T dO into acc_t buffers.
template <typename scalar_t>
void sb_backward_tiled(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const acc_type<scalar_t>* bias, double scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                       at::Tensor& dbias) {
  using acc_t = acc_type<scalar_t>;
  const auto dtype = q.scalar_type();
  const int64_t B = q.size(0), T = q.size(1), G = q.size(2), H = q.size(3), D = q.size(4), S = k.size(1);
  const auto acc_opts = q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor dk_acc = at::zeros({B * H, S, D}, acc_opts), dv_acc = at::zeros({B * H, S, D}, acc_opts);
  const int64_t tile = tile_positions(B, H, G, S, T, sizeof(acc_t));
  for (int64_t t0 = 0; t0 < T; t0 += tile) {
    const int64_t tn = std::min(tile, T - t0), rows = tn * G, width = S - T + t0 + tn;
    const at::Tensor kw = keys_bh(k, width), vw = keys_bh(v, width);
    const at::Tensor qt = queries_bh(q, t0, tn), gt = queries_bh(grad, t0, tn);  // [B*H, rows, D]
    at::Tensor w = bmm_acc<scalar_t>(qt, kw.transpose(1, 2));                    // [B*H, rows, W]
    at::Tensor g = bmm_acc<scalar_t>(gt, vw.transpose(1, 2));
    const int64_t n_rows = B * H * rows;
    const int64_t blocks = ceil_div(n_rows, kScanWarps);
    TORCH_CHECK(blocks < (int64_t(1) << 31), "molm::sb_attention_backward: too many rows for one launch");
    sb_scan_backward_kernel<acc_t><<<blocks, kScanWarps * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<acc_t>(), g.data_ptr<acc_t>(), n_rows, static_cast<int>(rows), rows, static_cast<int>(width),
        static_cast<int>(G), static_cast<int>(H), static_cast<int>(S - T + t0), static_cast<int>(S), bias,
        static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (dbias.numel() > 0) dbias.narrow(1, 0, width).add_(g.view({B, H * rows, width}).sum(1));
    const at::Tensor ws = w.to(dtype), gs = g.to(dtype);  // 16-bit operands for the tensor cores (fp32 accumulate)
    store_bh(dq, bmm_acc<scalar_t>(gs, kw).mul_(scale), t0, tn);
    dk_acc.narrow(1, 0, width).add_(bmm_acc<scalar_t>(gs.transpose(1, 2), qt), scale);
    dv_acc.narrow(1, 0, width).add_(bmm_acc<scalar_t>(ws.transpose(1, 2), gt));
  }
  dk.permute({0, 2, 1, 3}).copy_(dk_acc.view({B, H, S, D}));
  dv.permute({0, 2, 1, 3}).copy_(dv_acc.view({B, H, S, D}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sb_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& bias, double scale, bool bias_grad) {
  check_sb_attention_backward(grad_out, q, k, v, bias, bias_grad);
  check_int_sizes(q, k);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq, dk, dv, dbias;
  std::tie(dq, dk, dv, dbias) = sb_zero_grads(q, k, v, bias_grad);
  if (q.numel() == 0) return {dq, dk, dv, dbias};
  MOLM_DISPATCH_FLOATING(q.scalar_type(), "molm::sb_attention_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor bias_acc = sb_bias_as<acc_t>(bias);
    const acc_t* bp = sb_bias_ptr<acc_t>(bias_acc);
    const at::Tensor grad = grad_out.contiguous();
    if (sb_backward_fused<scalar_t>(grad, q, k, v, bp, scale, dq, dk, dv, dbias)) return;
    sb_backward_tiled<scalar_t>(grad, q, k, v, bp, scale, dq, dk, dv, dbias);
  });
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace molm::cuda

TORCH_LIBRARY_IMPL(molm, CUDA, m) {
  m.impl("sb_attention", &molm::cuda::sb_attention_cuda);
  m.impl("sb_attention_backward", &molm::cuda::sb_attention_backward_cuda);
}
