// DecodeRunner (decode_runner.h): Block.forward's direct path, block after block, through the dispatcher.
#include "decode_runner.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace molm {
namespace {

using OptTensor = std::optional<at::Tensor>;

const auto& linear_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("molm::linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, c10::string_view)>();
  return op;
}

// molm.ops.linear: x [..., K] -> [..., N] (2-D inputs go to the op as they are)
at::Tensor linear(const PlannedLinear& l, const at::Tensor& x, c10::string_view activation) {
  if (x.dim() == 2) return linear_op().call(x, l.weight, l.bias, activation);
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor y = linear_op().call(x.reshape({-1, x.size(-1)}), l.weight, l.bias, activation);
  lead.push_back(l.weight.size(0));
  return y.view(lead);
}

// Router.direct_logits: the mlp gate's GELU runs inside its first projection
at::Tensor router_logits(const std::vector<PlannedLinear>& router, const at::Tensor& h) {
  if (router.size() == 1) return linear(router[0], h, "none");
  return linear(router[1], linear(router[0], h, "gelu"), "none");
}

using Routing = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Routing route_topk(const at::Tensor& logits, int64_t k) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("molm::route_topk", "")
                             .typed<Routing(const at::Tensor&, int64_t)>();
  return op.call(logits, k);
}

at::Tensor moe_map(const at::Tensor& x, const at::Tensor& w, const OptTensor& s, const Routing& r, int64_t k) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("molm::moe_map", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, int64_t, c10::string_view)>();
  return op.call(x, w, s, std::get<3>(r), std::get<4>(r), std::get<5>(r), k, "none");
}

at::Tensor moe_reduce(const at::Tensor& x, const at::Tensor& w, const OptTensor& s, const Routing& r) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("molm::moe_reduce", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, w, s, std::get<1>(r), std::get<3>(r), std::get<4>(r), std::get<5>(r));
}

at::Tensor moe_mlp(const at::Tensor& x, const PlannedBlock& b, const Routing& r) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("molm::moe_mlp", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const OptTensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            c10::string_view)>();
  return op.call(x, b.mlp_in, b.mlp_in_scale, b.mlp_out, b.mlp_out_scale, std::get<1>(r), std::get<3>(r),
                 std::get<4>(r), std::get<5>(r), "gelu_new");
}

at::Tensor sb_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& bias,
                        double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("molm::sb_attention", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, double)>();
  return op.call(q, k, v, bias, scale);
}

}  // namespace

at::Tensor DecodeRunner::run(at::Tensor x, const OptTensor& bias, const std::vector<at::Tensor>& keys,
                             const std::vector<at::Tensor>& values, const at::Tensor& positions, int64_t length) const {
  TORCH_CHECK_VALUE(x.dim() == 3, "DecodeRunner: x must be [B, T, C], got ", x.sizes());
  TORCH_CHECK_VALUE(static_cast<int64_t>(keys.size()) == blocks(), "DecodeRunner: ", blocks(),
                    " blocks need as many key buffers, got ", keys.size());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  for (size_t l = 0; l < blocks_.size(); ++l) {
    const PlannedBlock& b = blocks_[l];
    // attention: MoA.forward's direct path
    const at::Tensor h = at::layer_norm(x, b.norm_shape, b.ln1_weight, b.ln1_bias, b.ln1_eps);
    at::Tensor h2 = h.reshape({B * T, C});
    Routing r = route_topk(router_logits(b.att_router, h2), b.att_k);
    const at::Tensor q = moe_map(h2, b.att_in, b.att_in_scale, r, b.att_k).view({B, T, b.att_k, b.heads, b.head_size});
    at::Tensor k_new = h, v_new;
    if (b.k_proj.has_value()) {
      k_new = linear(*b.k_proj, h, "none");
      v_new = linear(*b.v_proj, h, "none");
    }
    // KVCache.update: the one write per layer, then the first `length` positions
    keys[l].index_copy_(1, positions, k_new.detach().to(keys[l].scalar_type()));
    const at::Tensor k_all = keys[l].slice(1, 0, length);
    at::Tensor v_all = k_all;
    if (v_new.defined()) {
      TORCH_CHECK_VALUE(values.size() == keys.size(), "DecodeRunner: K/V projections need a value buffer per block");
      values[l].index_copy_(1, positions, v_new.detach().to(values[l].scalar_type()));
      v_all = values[l].slice(1, 0, length);
    }
    const at::Tensor o = sb_attention(q, k_all.view({B, length, b.heads, b.head_size}),
                                      v_all.view({B, length, b.heads, b.head_size}), bias, b.scale);
    const at::Tensor a = moe_reduce(o.reshape({B * T * b.att_k, b.heads * b.head_size}), b.att_out, b.att_out_scale, r);
    x = x + a.view({B, T, C});
    // MoE MLP: MoE.mlp's direct path
    h2 = at::layer_norm(x, b.norm_shape, b.ln2_weight, b.ln2_bias, b.ln2_eps).reshape({B * T, C});
    r = route_topk(router_logits(b.mlp_router, h2), b.mlp_k);
    x = x + moe_mlp(h2, b, r).view({B, T, C});
  }
  return x;
}

}  // namespace molm
