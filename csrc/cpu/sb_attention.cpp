// CPU fused stick-breaking attention (ModuleFormer variant). Never materialises an S x S matrix.
//  * direct path (decode, few new positions): per (b, t, h) the k slot queries of a token share every key read;
//    keys are walked from the query position down to 0 in fixed-size chunks (split-KV), each chunk with its own
//    running log-survival; chunks are combined newest to oldest (sb_combine_chunks). O(S * D) per query; a chunk's
//    logits, then its weights, then its weighted value sum (a second read of at most 512 rows, from L2), so the
//    largest buffer is [k, 512].
//  * tiled path (prefill): for a tile of query rows, logits [rows, W] by one GEMM, the reverse scan per row in
//    place (sb_scan_row), then weights @ V by a second GEMM. The largest buffer is [rows, S].
// bf16/fp16 inputs are computed in fp32, fp64 in fp64. Chunk and tile sizes are fixed, so results do not depend on
// the number of threads. The forward runs on the molm thread pool (thread_pool.h), the backward on ATen's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../sb_attention_common.h"
#include "../dispatch.h"
#include "core/sb_core.h"
#include "thread_pool.h"
#include "vec.h"

namespace molm::cpu {
namespace {

// Keys per split-KV chunk in the direct path. Fixed: chunks are counted from the query position, so left padding
// only adds fully masked chunks (which add exactly zero) and a padded row's result equals the unpadded one's.
constexpr int64_t kKeyChunk = 512;
constexpr int64_t kDirectMaxQueries = 4;  // T <= this takes the direct path
constexpr int64_t kTileRows = 128;        // query rows (positions x slots) per tile in the tiled path

template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    to_float(src, buf, n);
    return buf;
  }
}

template <typename scalar_t>
void sb_direct(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const acc_type<scalar_t>* bias,
               double scale_d, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = q.size(0), T = q.size(1), G = q.size(2), H = q.size(3), D = q.size(4), S = k.size(1);
  const int64_t n_chunks = (S + kKeyChunk - 1) / kKeyChunk;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int threads = max_threads();
  const int64_t n_rows = B * T * H;
  // A row's k slots share every key read; with fewer (row, chunk) items than threads (batch-1 decode) each slot gets
  // its own item instead. Slots never interact, so the results are the same either way.
  const int64_t per_item = n_rows * n_chunks < threads ? 1 : G, n_slot_groups = G / per_item;
  const int64_t n_groups = n_rows * n_slot_groups;  // (row, slot group) pairs
  // scratch: partial outputs and log-survivals per (b, t, h, slot, chunk); per-thread key/value/output buffers
  std::vector<acc_t> o_part(n_chunks > 1 ? n_rows * n_chunks * G * D : 0);
  std::vector<acc_t> s_part(n_chunks > 1 ? n_rows * n_chunks * G : 0);
  std::unique_ptr<std::atomic<int64_t>[]> chunks_left(new std::atomic<int64_t>[n_chunks > 1 ? n_groups : 0]);
  for (int64_t r = 0; r < (n_chunks > 1 ? n_groups : 0); ++r) chunks_left[r].store(n_chunks, std::memory_order_relaxed);
  const int64_t per_thread = 2 * per_item * D + 2 * D + per_item + per_item * kKeyChunk;
  std::vector<acc_t> scratch(threads * per_thread);
  // One region: the chunk that finishes a (row, slot group) last combines its chunks, newest to oldest (a fixed
  // order).
  parallel_items(n_groups * n_chunks, threads, [&](int64_t item, int slot) {
    acc_t* qbuf = scratch.data() + slot * per_thread;  // [per_item, D]
    acc_t* obuf = qbuf + per_item * D;                 // [per_item, D]
    acc_t* kbuf = obuf + per_item * D;                 // [D]
    acc_t* vbuf = kbuf + D;                            // [D]
    acc_t* cum = vbuf + D;                             // [per_item]
    acc_t* weights = cum + per_item;                   // [per_item, kKeyChunk] logits, then weights
    const int64_t group = item / n_chunks, c = item % n_chunks;
    const int64_t row = group / n_slot_groups, g0 = (group % n_slot_groups) * per_item;
    const int64_t b = row / (T * H), t = (row / H) % T, h = row % H;
    const int64_t i = S - T + t;                 // absolute query position
    const int64_t k_hi = i + 1 - c * kKeyChunk;  // keys [k_lo, k_hi) of this chunk, newest first
    const int64_t k_lo = std::max<int64_t>(0, k_hi - kKeyChunk);
    std::fill(obuf, obuf + per_item * D, acc_t(0));
    std::fill(cum, cum + per_item, acc_t(0));
    if (k_hi > 0) {
      for (int64_t g = 0; g < per_item; ++g) {
        const scalar_t* qg = qp + b * q.stride(0) + t * q.stride(1) + (g0 + g) * q.stride(2) + h * q.stride(3);
        for (int64_t d = 0; d < D; ++d) qbuf[g * D + d] = static_cast<acc_t>(qg[d]);
      }
      // Three passes over the chunk: the logits (independent dot products, so the key reads overlap), the
      // stick-breaking weights newest to oldest (scalar), then the weighted sum of the value rows, newest to oldest
      // (the rows now come from L2). The same operations in the same order as one fused pass: bitwise its result.
      const int64_t n = k_hi - k_lo;
      for (int64_t j = k_lo; j < k_hi; ++j) {
        const acc_t* kj = as_acc(kp + b * k.stride(0) + j * k.stride(1) + h * k.stride(2), kbuf, D);
        const acc_t bj = bias ? bias[b * S + j] : acc_t(0);
        for (int64_t g = 0; g < per_item; ++g)
          weights[g * kKeyChunk + (j - k_lo)] = dot(qbuf + g * D, kj, D) * scale + bj;
      }
      for (int64_t g = 0; g < per_item; ++g) {
        acc_t* wg = weights + g * kKeyChunk;
        for (int64_t r = n - 1; r >= 0; --r) {
          acc_t beta, ls;
          core::sb_terms(wg[r], beta, ls);
          wg[r] = beta * std::exp(cum[g]);
          cum[g] += ls;
        }
      }
      for (int64_t j = k_hi - 1; j >= k_lo; --j) {
        const acc_t* vj = nullptr;
        for (int64_t g = 0; g < per_item; ++g) {
          const acc_t a = weights[g * kKeyChunk + (j - k_lo)];
          if (a == acc_t(0)) continue;  // masked or negligible key: adds exactly zero
          if (!vj) vj = as_acc(vp + b * v.stride(0) + j * v.stride(1) + h * v.stride(2), vbuf, D);
          axpy(a, vj, obuf + g * D, D);
        }
      }
    }
    if (n_chunks > 1) {
      for (int64_t g = 0; g < per_item; ++g) {
        const int64_t slot_row = row * G + g0 + g;
        std::copy(obuf + g * D, obuf + (g + 1) * D, o_part.begin() + (slot_row * n_chunks + c) * D);
        s_part[slot_row * n_chunks + c] = cum[g];
      }
      if (chunks_left[group].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
      for (int64_t g = 0; g < per_item; ++g) {
        const int64_t slot_row = row * G + g0 + g;
        core::sb_combine_chunks(o_part.data() + slot_row * n_chunks * D, s_part.data() + slot_row * n_chunks, n_chunks,
                                D, D, obuf + g * D);
      }
    }
    for (int64_t g = 0; g < per_item; ++g) {
      scalar_t* o = op + (((b * T + t) * G + g0 + g) * H + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(obuf[g * D + d]);
    }
  });
}

template <typename scalar_t>
void sb_tiled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const acc_type<scalar_t>* bias,
              double scale_d, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = q.size(0), T = q.size(1), G = q.size(2), H = q.size(3), S = k.size(1);
  const int64_t tile_t = std::max<int64_t>(1, kTileRows / G);  // positions per tile
  const acc_t scale = static_cast<acc_t>(scale_d);
  const bool kv_same = k.data_ptr() == v.data_ptr() && k.strides() == v.strides();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const at::Tensor kf = k.select(0, b).select(1, h).to(acc_dtype);                 // [S, D]
      const at::Tensor vf = kv_same ? kf : v.select(0, b).select(1, h).to(acc_dtype);  // [S, D]
      for (int64_t t0 = 0; t0 < T; t0 += tile_t) {
        const int64_t tn = std::min(tile_t, T - t0), rows = tn * G;
        const int64_t width = S - T + t0 + tn;  // keys 0 .. last query position of the tile
        const at::Tensor qt = q.select(0, b).narrow(0, t0, tn).select(2, h).to(acc_dtype).reshape({rows, -1});
        at::Tensor logits = at::mm(qt, kf.narrow(0, 0, width).t());  // [rows, W]
        acc_t* lp = logits.data_ptr<acc_t>();
        const acc_t* bb = bias ? bias + b * S : nullptr;
        parallel_items(rows, max_threads(), [&](int64_t r, int) {
          core::sb_scan_row(lp + r * width, S - T + t0 + r / G, width, scale, bb);
        });
        const at::Tensor o = at::mm(logits, vf.narrow(0, 0, width));  // [rows, D]
        out.select(0, b).narrow(0, t0, tn).select(2, h).copy_(o.view({tn, G, -1}));
      }
    }
}

// o [B, T, k, H, D]: causal stick-breaking attention of the T newest positions over all S keys.
at::Tensor sb_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& bias, double scale) {
  check_sb_attention(q, k, v, bias);
  at::Tensor out = at::empty(q.sizes(), q.options());  // [B, T, k, H, D]
  if (out.numel() == 0) return out;
  MOLM_DISPATCH_FLOATING(q.scalar_type(), "molm::sb_attention", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor bias_acc = sb_bias_as<acc_t>(bias);  // [B, S] in the accumulation dtype
    const acc_t* bp = sb_bias_ptr<acc_t>(bias_acc);
    if (q.size(1) <= kDirectMaxQueries)
      sb_direct<scalar_t>(q, k, v, bp, scale, out);
    else
      sb_tiled<scalar_t>(q, k, v, bp, scale, out);
  });
  return out;
}

// Backward, tiled like the forward: per (b, h) and tile of query rows, logits = Q K^T and dA = dO V^T by two GEMMs,
// sb_backward_row per row (rows in parallel; A and dl replace them in place), then dQ = scale dl K for the tile, and
// the tile's share of dK = scale dl^T Q, dV = A^T dO added to per-(b, h) fp32 key-block accumulators in tile order
// (no atomics: every sum has a fixed order, so results are bitwise repeatable).
template <typename scalar_t>
void sb_backward_tiled(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const acc_type<scalar_t>* bias, double scale_d, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                       at::Tensor& dbias) {
  using acc_t = acc_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = q.size(0), T = q.size(1), G = q.size(2), H = q.size(3), S = k.size(1);
  const int64_t tile_t = std::max<int64_t>(1, kTileRows / G);
  const acc_t scale = static_cast<acc_t>(scale_d);
  const bool kv_same = k.data_ptr() == v.data_ptr() && k.strides() == v.strides();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const at::Tensor kf = k.select(0, b).select(1, h).to(acc_dtype);                 // [S, D]
      const at::Tensor vf = kv_same ? kf : v.select(0, b).select(1, h).to(acc_dtype);  // [S, D]
      at::Tensor dkf = at::zeros_like(kf), dvf = at::zeros_like(kf);                   // [S, D] accumulators
      for (int64_t t0 = 0; t0 < T; t0 += tile_t) {
        const int64_t tn = std::min(tile_t, T - t0), rows = tn * G;
        const int64_t width = S - T + t0 + tn;
        const at::Tensor qt = q.select(0, b).narrow(0, t0, tn).select(2, h).to(acc_dtype).reshape({rows, -1});
        const at::Tensor gt = grad.select(0, b).narrow(0, t0, tn).select(2, h).to(acc_dtype).reshape({rows, -1});
        const at::Tensor kw = kf.narrow(0, 0, width), vw = vf.narrow(0, 0, width);
        at::Tensor weights = at::mm(qt, kw.t());  // [rows, W]: scores, then A
        at::Tensor dlogits = at::mm(gt, vw.t());  // [rows, W]: dA, then dl
        acc_t* ap = weights.data_ptr<acc_t>();
        acc_t* gp = dlogits.data_ptr<acc_t>();
        const acc_t* bb = bias ? bias + b * S : nullptr;
        at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
          std::vector<acc_t> scratch(2 * width);
          for (int64_t r = lo; r < hi; ++r)
            core::sb_backward_row(ap + r * width, gp + r * width, S - T + t0 + r / G, width, scale, bb, scratch.data());
        });
        const at::Tensor dqt = at::mm(dlogits, kw).mul_(scale);  // [rows, D]
        dq.select(0, b).narrow(0, t0, tn).select(2, h).copy_(dqt.view({tn, G, -1}));
        dkf.narrow(0, 0, width).addmm_(dlogits.t(), qt, 1, scale);
        dvf.narrow(0, 0, width).addmm_(weights.t(), gt);
        if (dbias.defined() && dbias.numel() > 0) dbias.select(0, b).narrow(0, 0, width).add_(dlogits.sum(0));
      }
      dk.select(0, b).select(1, h).copy_(dkf);
      dv.select(0, b).select(1, h).copy_(dvf);
    }
}

// grad [B, T, k, H, D] -> (dq like q, dk like k, dv like v, dbias [B, S] in the accumulation dtype, or [0] when
// bias_grad is false).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sb_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& bias, double scale, bool bias_grad) {
  check_sb_attention_backward(grad_out, q, k, v, bias, bias_grad);
  at::Tensor dq, dk, dv, dbias;
  std::tie(dq, dk, dv, dbias) = sb_zero_grads(q, k, v, bias_grad);
  if (q.numel() == 0) return {dq, dk, dv, dbias};
  MOLM_DISPATCH_FLOATING(q.scalar_type(), "molm::sb_attention_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const at::Tensor bias_acc = sb_bias_as<acc_t>(bias);
    const acc_t* bp = sb_bias_ptr<acc_t>(bias_acc);
    sb_backward_tiled<scalar_t>(grad_out, q, k, v, bp, scale, dq, dk, dv, dbias);
  });
  return {dq, dk, dv, dbias};
}

}  // namespace
}  // namespace molm::cpu

TORCH_LIBRARY_IMPL(molm, CPU, m) {
  m.impl("sb_attention", &molm::cpu::sb_attention_cpu);
  m.impl("sb_attention_backward", &molm::cpu::sb_attention_backward_cpu);
}
