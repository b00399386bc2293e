// The trunk of a decode step of molm.engine.DecodePlan, in C++: every block's ops (layer norms, routers, route_topk,
// moe_map, the KV cache write, sb_attention, moe_reduce, moe_mlp, residual adds) called through the dispatcher on
// tensors captured once per generation. It is not an op: it runs the registered ops in the order and with the
// arguments of Block.forward's direct path, so its result is bitwise the model's on any device. What it saves is
// the Python between the ops (about 15 op calls per block, each a few microseconds from Python).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace molm {

struct PlannedLinear {
  at::Tensor weight;               // [N, K], molm::linear
  std::optional<at::Tensor> bias;  // [N]
};

struct PlannedBlock {
  std::vector<int64_t> norm_shape;  // LayerNorm normalized_shape
  at::Tensor ln1_weight, ln2_weight;
  std::optional<at::Tensor> ln1_bias, ln2_bias;
  double ln1_eps = 1e-5, ln2_eps = 1e-5;
  std::vector<PlannedLinear> att_router, mlp_router;  // one linear map, or two (GELU after the first)
  int64_t att_k = 0, mlp_k = 0;                       // the routers' top-k
  at::Tensor att_in, att_out, mlp_in, mlp_out;        // expert weights as the fused ops take them
  std::optional<at::Tensor> att_in_scale, att_out_scale, mlp_in_scale, mlp_out_scale;  // int8 experts
  int64_t heads = 0, head_size = 0;
  double scale = 0.0;
  std::optional<PlannedLinear> k_proj, v_proj;  // none: K = V = ln_1 output
};

class DecodeRunner {
 public:
  void add_block(PlannedBlock block) { blocks_.push_back(std::move(block)); }
  int64_t blocks() const { return static_cast<int64_t>(blocks_.size()); }

  // x [B, T, C] -> the last block's output. Block l writes its new keys (and values) at `positions` of
  // keys[l] (values[l]) [B, capacity, A] and attends to their first `length` positions; bias [B, length] or none.
  at::Tensor run(at::Tensor x, const std::optional<at::Tensor>& bias, const std::vector<at::Tensor>& keys,
                 const std::vector<at::Tensor>& values, const at::Tensor& positions, int64_t length) const;

 private:
  std::vector<PlannedBlock> blocks_;
};

}  // namespace molm
