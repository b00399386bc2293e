// CPU kernels of the fused MoE ops. The expert GEMVs read their input rows and write their output rows through the
// routing's slot ids (ScatterMoE's idea), so no permuted copy of the rows is made, and each op is one parallel
// region over the active experts' weights:
//   moe_map    out[s] = act(x[s / k] @ W[e(s)])                          [M, Nout], slot order
//   moe_reduce out[n] = sum_j gates[n, j] * (x[n*k + j] @ W[e(n, j)])    [N, Nout]
//   moe_mlp    moe_reduce(moe_map(x, W1, k, act), W2): one region per weight, each streaming its active experts'
//              depth chunks in memory order.
// Float weights [E, in, out] go through expert_gemm's GEMV (expert_gemv.h): same depth chunks, same sums in the same
// order, so on this path the ops give bitwise what gather_rows -> expert_gemm -> scatter_ksum give. int8 weights
// [E, out, in] with scales [E, out] go through expert_gemm_q8's dot rows. Routings with a segment too large for a GEMV
// (prefill, training) run the composition of the grouped-GEMM ops instead (moe_compose.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <memory>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../moe_compose.h"
#include "expert_gemv.h"
#include "gelu.h"
#include "thread_pool.h"
#include "vec.h"

namespace molm::cpu {
namespace {

struct Segment {
  int64_t expert, lo, rows;  // rows lo .. lo + rows of the expert-sorted order
};

// One expert weight as the GEMVs read it. Float: [E, in, out] in the activations' dtype; int8: [E, out, in] output
// rows with fp32 scales [E, out].
template <typename w_t>
struct ExpertWeight {
  static constexpr bool kInt8 = std::is_same_v<w_t, int8_t>;
  const w_t* w = nullptr;
  int64_t s0 = 0, s1 = 0, in = 0, out = 0;
  const float* scale = nullptr;  // int8
  GemvFn<w_t> gemv = nullptr;    // float

  ExpertWeight(const at::Tensor& weight, const at::Tensor& scale32) : w(weight.data_ptr<w_t>()) {
    s0 = weight.stride(0);
    s1 = weight.stride(1);
    if constexpr (kInt8) {
      out = weight.size(1);
      in = weight.size(2);
      scale = scale32.data_ptr<float>();
    } else {
      in = weight.size(1);
      out = weight.size(2);
      gemv = gemv_body<w_t>();
    }
  }

  // Depth rows per partial sum and output columns per work item (expert_gemm's and expert_gemm_q8's).
  int64_t depth_chunk() const { return kInt8 ? in : kGemvDepthChunk; }
  int64_t col_block() const { return kInt8 ? kQ8RowBlock : kGemvColBlock; }

  // y[r * ldy + c] = sum_{d < depth} x[r * ldx + d] * W_e[d0 + d, c0 + c] for r < rows, c < cols (y overwritten);
  // int8: times the output channel's scale, with contiguous x rows (ldx == depth).
  void project(Isa isa, int64_t e, const float* x, int64_t ldx, int64_t rows, int64_t d0, int64_t depth, int64_t c0,
               int64_t cols, float* y, int64_t ldy) const {
    if constexpr (kInt8) {
      TORCH_INTERNAL_ASSERT(ldx == depth);
      gemv_rows_q8(isa, x, rows, depth, w + e * s0 + c0 * s1 + d0, s1, scale + e * out + c0, cols, y, ldy);
    } else {
      gemv_chunk(gemv, x, ldx, rows, depth, w + e * s0 + d0 * s1 + c0, s1, y, ldy, cols);
    }
  }
};

// The value a projection leaves in the activations' dtype, activation applied as expert_gemm does (rounded, gelu_new
// of the rounded value, rounded again) or, for int8 weights, as expert_gemm_q8 does (gelu_new in fp32, rounded once).
template <typename scalar_t, bool kInt8>
inline float finish_projection(float acc, bool gelu) {
  if constexpr (kInt8) {
    return static_cast<float>(static_cast<scalar_t>(gelu ? gelu_new(acc) : acc));
  } else {
    const float pre = static_cast<float>(static_cast<scalar_t>(acc));
    return gelu ? static_cast<float>(static_cast<scalar_t>(gelu_new(pre))) : pre;
  }
}

// The routing's expert segments, or false when one is larger than the GEMV serves.
bool small_segments(const std::vector<int64_t>& b, int64_t max_rows, std::vector<Segment>& segs) {
  for (size_t e = 0; e + 1 < b.size(); ++e) {
    const int64_t rows = b[e + 1] - b[e];
    if (rows > max_rows) return false;
    if (rows > 0) segs.push_back({static_cast<int64_t>(e), b[e], rows});
  }
  return true;
}

// sorted_slots must be a permutation of 0 .. M-1: every output row is written exactly once, never out of bounds.
void check_permutation(const char* op, const at::Tensor& sorted_slots) {
  const int64_t m = sorted_slots.numel();
  const int64_t* p = sorted_slots.data_ptr<int64_t>();
  std::vector<bool> seen(m, false);
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < m && !seen[p[i]], op,
                      ": sorted_slots must be a permutation of 0 .. M-1 (M = ", m, "), got ", p[i], " at position ", i);
    seen[p[i]] = true;
  }
}

// xs[i] = x[slots[i] / group] in fp32: the input rows in expert order, [M, K]
template <typename scalar_t>
std::vector<float> gather_fp32(const at::Tensor& x, const int64_t* slots, int64_t m, int64_t group) {
  const int64_t depth = x.size(1), ld = x.stride(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  std::vector<float> xs(m * depth);
  for (int64_t i = 0; i < m; ++i) {
    const scalar_t* src = xp + (slots[i] / group) * ld;
    for (int64_t d = 0; d < depth; ++d) xs[i * depth + d] = static_cast<float>(src[d]);
  }
  return xs;
}

// Every segment's rows times its expert's weight, in (segment, depth chunk, column block) items; the item that
// completes a (segment, column block) sums its depth chunks in chunk order and hands each row's values to
// done(sorted row, first column, values, columns).
template <typename w_t, typename Done>
void project_segments(const ExpertWeight<w_t>& W, const std::vector<Segment>& segs, const float* xs, int64_t m,
                      Done done) {
  const int64_t depth = W.in, cols = W.out, chunk = W.depth_chunk(), block = W.col_block();
  const int64_t n_kc = ceil_div(depth, chunk), n_cb = ceil_div(cols, block);
  const int64_t n_blocks = static_cast<int64_t>(segs.size()) * n_cb;
  std::vector<float> partial(n_kc * m * cols);  // [chunks, M, Nout]
  float* pp = partial.data();
  std::unique_ptr<std::atomic<int64_t>[]> chunks_left(new std::atomic<int64_t>[n_blocks]);
  for (int64_t i = 0; i < n_blocks; ++i) chunks_left[i].store(n_kc, std::memory_order_relaxed);
  const Isa isa = active_isa();  // one body for the whole call
  parallel_items(n_blocks * n_kc, max_threads(), [&](int64_t it, int) {
    const int64_t seg = it / (n_kc * n_cb), kc = (it / n_cb) % n_kc, cb = it % n_cb;
    const Segment& s = segs[seg];
    const int64_t d0 = kc * chunk, c0 = cb * block, nc = std::min(block, cols - c0);
    W.project(isa, s.expert, xs + s.lo * depth + d0, depth, s.rows, d0, std::min(chunk, depth - d0), c0, nc,
              pp + (kc * m + s.lo) * cols + c0, cols);
    if (chunks_left[seg * n_cb + cb].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    for (int64_t r = 0; r < s.rows; ++r) {
      float* row = pp + (s.lo + r) * cols + c0;  // chunk 0's row receives the sum
      for (int64_t c = 0; c < nc; ++c) {
        float acc = 0.f;
        for (int64_t k = 0; k < n_kc; ++k) acc += pp[(k * m + s.lo + r) * cols + c0 + c];
        row[c] = acc;
      }
      done(s.lo + r, c0, row, nc);
    }
  });
}

// out[n] = sum_j gates[n, j] * ys[n*k + j] in slot order, in fp32 from zero (scatter_ksum's sum)
template <typename scalar_t>
void ksum_slots(const std::vector<float>& ys, const at::Tensor& gates, at::Tensor& out) {
  const int64_t n = gates.size(0), k = gates.size(1), cols = out.size(1);
  const at::Tensor g = gates.to(at::kFloat).contiguous();
  const float* gp = g.data_ptr<float>();
  scalar_t* op = out.data_ptr<scalar_t>();
  std::vector<float> acc(cols);
  for (int64_t t = 0; t < n; ++t) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t j = 0; j < k; ++j) {
      const float gj = gp[t * k + j];
      const float* row = ys.data() + (t * k + j) * cols;
      for (int64_t c = 0; c < cols; ++c) acc[c] += gj * row[c];
    }
    for (int64_t c = 0; c < cols; ++c) op[t * cols + c] = static_cast<scalar_t>(acc[c]);
  }
}

template <typename scalar_t, typename w_t>
void moe_map_gemv(const at::Tensor& x, const ExpertWeight<w_t>& W, const int64_t* slots,
                  const std::vector<Segment>& segs, int64_t k, bool gelu, at::Tensor& out) {
  const int64_t m = out.size(0), cols = W.out;
  const std::vector<float> xs = gather_fp32<scalar_t>(x, slots, m, k);
  scalar_t* op = out.data_ptr<scalar_t>();
  project_segments(W, segs, xs.data(), m, [&](int64_t i, int64_t c0, const float* v, int64_t nc) {
    scalar_t* dst = op + slots[i] * cols + c0;
    for (int64_t c = 0; c < nc; ++c)
      dst[c] = static_cast<scalar_t>(finish_projection<scalar_t, ExpertWeight<w_t>::kInt8>(v[c], gelu));
  });
}

template <typename scalar_t, typename w_t>
void moe_reduce_gemv(const at::Tensor& x, const ExpertWeight<w_t>& W, const at::Tensor& gates, const int64_t* slots,
                     const std::vector<Segment>& segs, at::Tensor& out) {
  const int64_t m = x.size(0), cols = W.out;
  const std::vector<float> xs = gather_fp32<scalar_t>(x, slots, m, 1);
  std::vector<float> ys(m * cols);  // each slot's projection, rounded to the activations' dtype, slot order
  project_segments(W, segs, xs.data(), m, [&](int64_t i, int64_t c0, const float* v, int64_t nc) {
    float* dst = ys.data() + slots[i] * cols + c0;
    for (int64_t c = 0; c < nc; ++c) dst[c] = finish_projection<scalar_t, ExpertWeight<w_t>::kInt8>(v[c], false);
  });
  ksum_slots<scalar_t>(ys, gates, out);
}

// Calls body.template operator()<scalar_t, w_t>() for the activations' dtype and the weight's kind (same dtype or
// int8); false for the dtypes the GEMV does not serve (fp64).
template <typename Body>
bool dispatch_gemv(const at::Tensor& x, bool int8, Body&& body) {
  const auto with = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (int8) {
      body.template operator()<scalar_t, int8_t>();
      return true;
    }
    body.template operator()<scalar_t, scalar_t>();
    return true;
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      return with(float{});
    case at::kBFloat16:
      return with(c10::BFloat16{});
    case at::kHalf:
      return with(c10::Half{});
    default:
      return false;
  }
}

// Whether a weight can be read by the GEMVs here: contiguous rows, a non-empty depth.
bool gemv_weight(const at::Tensor& weight, int64_t depth) { return weight.stride(2) == 1 && depth > 0; }

int64_t max_rows_for(const at::Tensor& x, bool int8) { return int8 ? kGemvMaxRows : gemv_max_rows(x.scalar_type()); }

at::Tensor scale_fp32(const c10::optional<at::Tensor>& scale) {
  return scale.has_value() ? scale->to(at::kFloat).contiguous() : at::Tensor();
}

// The GEMV paths of moe_map and moe_reduce for routings whose segments `small_segments` accepted: the output, or an
// undefined tensor for a dtype the GEMV does not serve.
at::Tensor map_by_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                       const at::Tensor& sorted_slots, const std::vector<Segment>& segs, int64_t k, bool gelu) {
  const bool int8 = scale.has_value();
  at::Tensor out = at::empty({x.size(0) * k, int8 ? weight.size(1) : weight.size(2)}, x.options());  // slot order
  const at::Tensor s32 = scale_fp32(scale);
  const bool done = dispatch_gemv(x, int8, [&]<typename scalar_t, typename w_t>() {
    moe_map_gemv<scalar_t>(x, ExpertWeight<w_t>(weight, s32), sorted_slots.data_ptr<int64_t>(), segs, k, gelu, out);
  });
  return done ? out : at::Tensor();
}

at::Tensor reduce_by_gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                          const at::Tensor& gates, const at::Tensor& sorted_slots, const std::vector<Segment>& segs) {
  const bool int8 = scale.has_value();
  at::Tensor out = at::empty({gates.size(0), int8 ? weight.size(1) : weight.size(2)}, x.options());  // [N, Nout]
  const at::Tensor s32 = scale_fp32(scale);
  const bool done = dispatch_gemv(x, int8, [&]<typename scalar_t, typename w_t>() {
    moe_reduce_gemv<scalar_t>(x, ExpertWeight<w_t>(weight, s32), gates, sorted_slots.data_ptr<int64_t>(), segs, out);
  });
  return done ? out : at::Tensor();
}

at::Tensor moe_map_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                       const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                       const at::Tensor& expert_offsets, int64_t k, c10::string_view activation) {
  check_moe_map(x, weight, scale, sorted_slots, slot_positions, expert_offsets, k, activation);
  const bool int8 = scale.has_value();
  const int64_t m = x.size(0) * k, cols = int8 ? weight.size(1) : weight.size(2);
  const std::vector<int64_t> b = read_expert_offsets("molm::moe_map", expert_offsets, m);
  check_permutation("molm::moe_map", sorted_slots);
  if (m * cols == 0) return at::empty({m, cols}, x.options());
  std::vector<Segment> segs;
  if (gemv_weight(weight, x.size(1)) && small_segments(b, max_rows_for(x, int8), segs)) {
    at::Tensor out = map_by_gemv(x, weight, scale, sorted_slots, segs, k, activation == "gelu_new");
    if (out.defined()) return out;
  }
  return moe_map_composed(x, weight, scale, sorted_slots, slot_positions, expert_offsets, k, activation);
}

at::Tensor moe_reduce_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                          const at::Tensor& gates, const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                          const at::Tensor& expert_offsets) {
  check_moe_reduce(x, weight, scale, gates, sorted_slots, slot_positions, expert_offsets);
  const bool int8 = scale.has_value();
  const int64_t cols = int8 ? weight.size(1) : weight.size(2);
  const std::vector<int64_t> b = read_expert_offsets("molm::moe_reduce", expert_offsets, x.size(0));
  check_permutation("molm::moe_reduce", sorted_slots);
  if (gates.size(0) * cols == 0) return at::empty({gates.size(0), cols}, x.options());
  std::vector<Segment> segs;
  if (gemv_weight(weight, x.size(1)) && small_segments(b, max_rows_for(x, int8), segs)) {
    at::Tensor out = reduce_by_gemv(x, weight, scale, gates, sorted_slots, segs);
    if (out.defined()) return out;
  }
  return moe_reduce_composed(x, weight, scale, gates, sorted_slots, slot_positions, expert_offsets);
}

at::Tensor moe_mlp_cpu(const at::Tensor& x, const at::Tensor& w1, const c10::optional<at::Tensor>& scale1,
                       const at::Tensor& w2, const c10::optional<at::Tensor>& scale2, const at::Tensor& gates,
                       const at::Tensor& sorted_slots, const at::Tensor& slot_positions,
                       const at::Tensor& expert_offsets, c10::string_view activation) {
  check_moe_mlp(x, w1, scale1, w2, scale2, gates, sorted_slots, slot_positions, expert_offsets, activation);
  const std::vector<int64_t> b = read_expert_offsets("molm::moe_mlp", expert_offsets, gates.numel());
  check_permutation("molm::moe_mlp", sorted_slots);
  // Decode-sized routings: moe_map's GEMV (+ activation) then moe_reduce's, two regions that each stream whole depth
  // chunks of their weight in memory order (one region over (expert, hidden chunk) items, which reads the up
  // projection in 512-byte strips of 4 KB-strided rows, measured slower: the hardware prefetcher follows such strips
  // badly). Larger routings keep the hidden rows in expert order between the two grouped GEMMs.
  std::vector<Segment> segs;
  const bool int8 = scale1.has_value();
  if (gemv_weight(w1, x.size(1)) && gemv_weight(w2, w1.size(int8 ? 1 : 2)) &&
      small_segments(b, max_rows_for(x, int8), segs)) {
    const at::Tensor h = map_by_gemv(x, w1, scale1, sorted_slots, segs, gates.size(1), activation == "gelu_new");
    if (h.defined()) return reduce_by_gemv(h, w2, scale2, gates, sorted_slots, segs);  // h: [M, F] slot order
  }
  return moe_mlp_composed(x, w1, scale1, w2, scale2, gates, sorted_slots, slot_positions, expert_offsets, activation);
}

}  // namespace
}  // namespace molm::cpu

TORCH_LIBRARY_IMPL(molm, CPU, m) {
  m.impl("moe_map", &molm::cpu::moe_map_cpu);
  m.impl("moe_reduce", &molm::cpu::moe_reduce_cpu);
  m.impl("moe_mlp", &molm::cpu::moe_mlp_cpu);
}
