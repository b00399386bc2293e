"""Pure-torch twins of every molm op: the oracle for the kernel tests and the model's "reference" backend.

Written for clarity, not speed. Each function has the same signature and the same outputs as the op of the
same name in `molm.ops` (without the `_ref` suffix). Shapes use one alphabet:
N tokens, k slots per token, E experts, M = N*k rows, C/D widths, B batch, T new positions, S cached + new.
"""

from __future__ import annotations

import math

import torch


def route_topk_ref(logits: torch.Tensor, k: int):
    """softmax over E experts, top-k of the probabilities (gate = raw probability), stable sort by expert.

    logits [N, E] -> probs [N, E] (logits dtype), gates [N, k] (logits dtype), experts [N, k] int64,
    sorted_slots [M] int64 (slot ids n*k+j ordered by expert, ties by slot id),
    slot_positions [M] int64 (inverse permutation: where slot n*k+j sits in sorted order),
    expert_offsets [E+1] int64 (rows of expert e are sorted positions offsets[e] .. offsets[e+1]).
    """
    probs = torch.softmax(logits, dim=-1)  # [N, E]
    gates, experts = torch.topk(probs, k, dim=-1)  # [N, k] each
    return (probs, gates, experts) + sort_by_expert(experts, logits.shape[1])


def sort_by_expert(experts: torch.Tensor, n_experts: int):
    """Stable sort of the (token, slot) pairs by expert: experts [N, k] -> sorted_slots, slot_positions, offsets."""
    flat = experts.reshape(-1)  # [M]
    sorted_slots = torch.sort(flat, stable=True).indices  # [M]
    slot_positions = torch.empty_like(sorted_slots)
    slot_positions[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    counts = torch.bincount(flat, minlength=n_experts)  # [E]
    expert_offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=experts.device)
    expert_offsets[1:] = torch.cumsum(counts, 0)
    return sorted_slots, slot_positions, expert_offsets


LINEAR_ACTIVATIONS = ("none", "gelu")


def linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none"
) -> torch.Tensor:
    """y = act(x @ weight^T + bias). x [M, K], weight [N, K] (nn.Linear layout), bias [N] or None -> [M, N];
    activation "none" or "gelu" (nn.GELU: exact, erf-based)."""
    if activation not in LINEAR_ACTIVATIONS:
        raise ValueError(f"linear: activation must be one of {LINEAR_ACTIVATIONS}, got {activation!r}")
    y = torch.nn.functional.linear(x, weight, bias)
    return torch.nn.functional.gelu(y) if activation == "gelu" else y


def expert_gemm_q8_ref(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, expert_offsets: torch.Tensor, activation: str = "none"
) -> torch.Tensor:
    """expert_gemm with int8 weights stored as output rows: W[e] = (qweight[e] * scale[e][:, None])^T, in fp32,
    output in x's dtype. qweight [E, N, K] int8, scale [E, N]."""
    weight = (qweight.float() * scale.float()[:, :, None]).transpose(1, 2)
    return expert_gemm_ref(x.float(), weight, expert_offsets, activation).to(x.dtype)


def linear_q8_ref(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """linear with int8 weights: W = qweight * scale[:, None], in fp32, output in x's dtype. qweight [N, K] int8."""
    weight = qweight.float() * scale.float()[:, None]
    return linear_ref(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)


def gather_rows_ref(x: torch.Tensor, index: torch.Tensor, group: int = 1) -> torch.Tensor:
    """out[i] = x[index[i] // group]. x [R, C], index [M] -> [M, C]."""
    return x[torch.div(index, group, rounding_mode="floor")]


def scatter_ksum_ref(y: torch.Tensor, gates: torch.Tensor, slot_positions: torch.Tensor) -> torch.Tensor:
    """out[n] = sum_j gates[n, j] * y[slot_positions[n*k + j]], summed in slot order j = 0..k-1 in fp32.

    y [M, C] in expert-sorted order, gates [N, k], slot_positions [M] -> [N, C] in y's dtype.
    """
    n_tokens, k = gates.shape
    rows = y[slot_positions].float().view(n_tokens, k, y.shape[1])  # [N, k, C] (also for N = 0)
    g = gates.float()
    out = torch.zeros(n_tokens, y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(k):
        out += g[:, j, None] * rows[:, j]
    return out.to(y.dtype)


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU approximation of GPT-2 (transformers' "gelu_new")."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = ("none", "gelu_new")


def expert_gemm_ref(
    x: torch.Tensor, weight: torch.Tensor, expert_offsets: torch.Tensor, activation: str = "none"
) -> torch.Tensor:
    """Grouped GEMM over contiguous expert segments: out[rows of e] = act(x[rows of e] @ weight[e]).

    x [M, K] expert-sorted, weight [E, K, Nout] ([expert, in, out]), expert_offsets [E+1] -> [M, Nout].
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"expert_gemm: activation must be one of {ACTIVATIONS}, got {activation!r}")
    out = x.new_zeros(x.shape[0], weight.shape[2])
    bounds = expert_offsets.tolist()
    for e in range(weight.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        # stated rather than branched on (an empty segment is a no-op), so torch.export can trace data-dependent bounds
        torch._check(lo >= 0)
        torch._check(hi >= lo)
        torch._check(hi <= x.shape[0])
        out[lo:hi] = x[lo:hi] @ weight[e]
    return gelu_new(out) if activation == "gelu_new" else out


def sb_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Stick-breaking attention as ModuleFormer computes it (docs/model.md §3.5), in the inputs' dtype.

    q [B, T, k, H, D] (queries are the last T of the S positions), k/v [B, S, H, D], bias [B, S] additive
    (float32, e.g. dtype-min on padding) or None -> o [B, T, k, H, D].
    l_ij = q_i.k_j*scale + bias_j; beta = sigmoid(l) for j <= i, A_ij = beta_ij * prod_{j<m<=i} (1 - beta_im);
    the leftover mass is dropped. Materialises [T, S] logits and the S x S triangular matrix like the original.
    """
    B, T, K, H, D = q.shape
    S = k.shape[1]
    logits = torch.einsum("btkhd,bshd->bkhts", q, k) * scale  # [B, k, H, T, S]
    if bias is not None:
        logits = logits + bias.to(logits.dtype)[:, None, None, None, :]
    query_pos = torch.arange(S - T, S, device=q.device)[:, None]  # [T, 1]
    key_pos = torch.arange(S, device=q.device)[None, :]  # [1, S]
    blocked = key_pos > query_pos  # [T, S] True above the causal diagonal
    beta = torch.sigmoid(logits).masked_fill(blocked, 0)
    log_survive = torch.nn.functional.logsigmoid(-logits).masked_fill(blocked, 0)
    # strictly lower triangular ones, entry [m, j] = 1 iff m > j: sums log(1-beta) over the keys newer than j
    newer = torch.tril(torch.ones(S, S, dtype=logits.dtype, device=q.device), diagonal=-1)
    weights = beta * torch.exp(log_survive @ newer)  # [B, k, H, T, S]
    return torch.einsum("bkhts,bshd->btkhd", weights, v)


def _expert_projection(x, weight, scale, expert_offsets, activation):
    """expert_gemm_ref for a float weight [E, K, Nout]; expert_gemm_q8_ref for int8 [E, Nout, K] + scale [E, Nout]."""
    if scale is None:
        return expert_gemm_ref(x, weight, expert_offsets, activation)
    return expert_gemm_q8_ref(x, weight, scale, expert_offsets, activation)


def moe_map_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    sorted_slots: torch.Tensor,
    slot_positions: torch.Tensor,
    expert_offsets: torch.Tensor,
    k: int,
    activation: str = "none",
) -> torch.Tensor:
    """out[s] = act(x[s // k] @ W[e(s)]) for every slot s, in slot order: x [N, K] -> [N*k, Nout].

    weight [E, K, Nout] in x's dtype, or int8 [E, Nout, K] with scale [E, Nout]; the routing as route_topk gives it.
    Equals gather_rows -> expert_gemm (or expert_gemm_q8) -> back to slot order.
    """
    y = _expert_projection(gather_rows_ref(x, sorted_slots, k), weight, scale, expert_offsets, activation)
    return gather_rows_ref(y, slot_positions)


def moe_reduce_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    gates: torch.Tensor,
    sorted_slots: torch.Tensor,
    slot_positions: torch.Tensor,
    expert_offsets: torch.Tensor,
) -> torch.Tensor:
    """out[n] = sum_j gates[n, j] * (x[n*k + j] @ W[e(n, j)]): x [N*k, K] in slot order -> [N, Nout], the k-sum in
    fp32 in slot order (scatter_ksum's)."""
    y = _expert_projection(gather_rows_ref(x, sorted_slots), weight, scale, expert_offsets, "none")
    return scatter_ksum_ref(y, gates, slot_positions)


def moe_mlp_ref(
    x: torch.Tensor,
    w1: torch.Tensor,
    scale1: torch.Tensor | None,
    w2: torch.Tensor,
    scale2: torch.Tensor | None,
    gates: torch.Tensor,
    sorted_slots: torch.Tensor,
    slot_positions: torch.Tensor,
    expert_offsets: torch.Tensor,
    activation: str = "gelu_new",
) -> torch.Tensor:
    """A whole MoE MLP: out[n] = sum_j gates[n, j] * (act(x[n] @ W1[e]) @ W2[e]), e = e(n, j). x [N, C] -> [N, C]."""
    h = _expert_projection(gather_rows_ref(x, sorted_slots, gates.shape[1]), w1, scale1, expert_offsets, activation)
    y = _expert_projection(h, w2, scale2, expert_offsets, "none")
    return scatter_ksum_ref(y, gates, slot_positions)
