// Every molm op schema, once. Implementations live beside their kernels: csrc/cpu/<family>.cpp and
// csrc/cuda/<family>.cu each end with their own TORCH_LIBRARY_IMPL. Python wrappers, fakes and autograd: molm/ops.py.
// Semantics of every op: its `<name>_ref` twin in molm/reference.py.
#include <torch/library.h>

TORCH_LIBRARY(molm, m) {
  // softmax over E, top-k of the probabilities (ties -> lower expert), stable counting sort of the N*k slots by expert
  m.def(
      "route_topk(Tensor logits, int k) -> (Tensor probs, Tensor gates, Tensor experts, Tensor sorted_slots, "
      "Tensor slot_positions, Tensor expert_offsets)");
  // out[i] = x[index[i] // group]
  m.def("gather_rows(Tensor x, Tensor index, int group) -> Tensor");
  // out[n] = sum_{j=0..k-1} gates[n, j] * y[slot_positions[n*k + j]], fp32 accumulation in slot order, no atomics
  m.def("scatter_ksum(Tensor y, Tensor gates, Tensor slot_positions) -> Tensor");
  // out[rows of e] = act(x[rows of e] @ weight[e]) over contiguous expert segments; activation "none" | "gelu_new"
  m.def("expert_gemm(Tensor x, Tensor weight, Tensor expert_offsets, str activation) -> Tensor");
  // y = act(x @ weight^T (+ bias)) with nn.Linear weights [N, K]: lm_head, routers, K/V projections (decode-sized
  // x streams the weight once, in its own dtype); activation "none" | "gelu" (exact GELU, the routers' first layer)
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, str activation=\"none\") -> Tensor");
  // int8 weight-only variants (molm.quantize): y = (x @ qweight) * scale per output channel, fp32 accumulation;
  // qweight [E, N, K] int8 (experts stored as output rows) with scale [E, N] / qweight [N, K] int8 with scale [N]
  m.def("expert_gemm_q8(Tensor x, Tensor qweight, Tensor scale, Tensor expert_offsets, str activation) -> Tensor");
  m.def("linear_q8(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor");
  // Fused MoE sites: the expert GEMMs read their input rows and write their output rows through the routing's slot
  // ids, so no permuted copy of the rows is made. weight: float [E, K, Nout] in x's dtype, or int8 [E, Nout, K] with
  // its scale [E, Nout]; sorted_slots / slot_positions / expert_offsets as route_topk returns them.
  //   moe_map:    out[s] = act(x[s // k] @ weight[e(s)]), [M = N*k, Nout] in slot order
  //   moe_reduce: out[n] = sum_j gates[n, j] * (x[n*k + j] @ weight[e(n, j)]), x in slot order, fp32 k-sum in slot
  //               order, [N, Nout]
  //   moe_mlp:    moe_reduce(moe_map(x, w1, k, activation), w2): a whole MoE MLP, [N, C]
  m.def(
      "moe_map(Tensor x, Tensor weight, Tensor? scale, Tensor sorted_slots, Tensor slot_positions, "
      "Tensor expert_offsets, int k, str activation) -> Tensor");
  m.def(
      "moe_reduce(Tensor x, Tensor weight, Tensor? scale, Tensor gates, Tensor sorted_slots, Tensor slot_positions, "
      "Tensor expert_offsets) -> Tensor");
  m.def(
      "moe_mlp(Tensor x, Tensor w1, Tensor? scale1, Tensor w2, Tensor? scale2, Tensor gates, Tensor sorted_slots, "
      "Tensor slot_positions, Tensor expert_offsets, str activation) -> Tensor");
  // backward helper: grad_weight[e] = x[rows of e]^T @ grad_out[rows of e] (zeros for an empty expert), [E, K, Nout]
  m.def("expert_gemm_wgrad(Tensor x, Tensor grad_out, Tensor expert_offsets, int num_experts) -> Tensor");
  // fused causal stick-breaking attention (ModuleFormer variant), q [B,T,k,H,D], k/v [B,S,H,D], bias [B,S] ->
  // [B,T,k,H,D]
  m.def("sb_attention(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale) -> Tensor");
  // its backward: (dq, dk, dv, dbias [B,S] fp32 (fp64 for fp64), or [0,0] when not bias_grad); dk/dv without atomics
  m.def(
      "sb_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, float scale, "
      "bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}
