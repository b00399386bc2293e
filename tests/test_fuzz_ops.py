"""Property-based tests (hypothesis) of every molm op against its pure-torch twin in molm.reference.

Random shapes (0 and 1 tokens, E up to 256, k from 1 to E, odd widths), layouts (contiguous, sliced rows, transposed,
channels-last, expanded, strided cache views) and dtypes (fp32, bf16, fp16). Each case must either match the
reference (integers exactly, floats within tests/tolerances.py) or raise one clear ValueError/TypeError naming the
op: never a crash, never a silent wrong result. `test_malformed_inputs_*` feed inconsistent arguments on purpose.

The profile is fixed (derandomize=True, bounded max_examples, no example database) so CI runs the same cases every
time; MOLM_FUZZ_EXAMPLES scales the number of examples for a longer local hunt.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from molm import ops, reference

from tolerances import assert_close

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason=f"molm._C not built: {ops.extension_error()}")

SCALE = float(os.environ.get("MOLM_FUZZ_EXAMPLES", "1"))


def fuzz(n: int):
    return settings(
        max_examples=max(1, int(n * SCALE)),
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
SEEDS = st.integers(0, 2**31 - 1)
CLEAR_ERRORS = (ValueError, TypeError)


def randn(shape, seed, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def relayout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values, other strides."""
    if kind == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if kind == "sliced":  # padded rows and a storage offset; stride(-1) stays 1
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2 + 3, dtype=t.dtype)
        out = big[..., 3 : 3 + t.shape[-1]]
        out.copy_(t)
        return out
    if kind == "transposed":  # last two dims swapped in memory: stride(-1) != 1
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    if kind == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
        return t.contiguous(memory_format=fmt) if fmt else t
    raise ValueError(kind)


LAYOUTS = st.sampled_from(["contiguous", "sliced", "transposed", "channels_last"])


def run_or_clear_error(op_name, fn, *args):
    """The op's result, or None when it raised a clear error (which must name the op)."""
    try:
        out = fn(*args)
    except CLEAR_ERRORS as exc:
        assert f"molm::{op_name}" in str(exc), f"unclear error from {op_name}: {exc}"
        event(f"{op_name}: refused ({type(exc).__name__})")
        return None
    event(f"{op_name}: ran")
    return out


def check_sort(experts, sorted_slots, slot_positions, offsets, n_experts):
    flat = experts.reshape(-1)
    assert torch.equal(sorted_slots, torch.sort(flat, stable=True).indices)
    assert torch.equal(slot_positions[sorted_slots], torch.arange(flat.numel()))
    counts = torch.bincount(flat, minlength=n_experts)
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))


# ------------------------------------------------------------------------------------------------------ route_topk
@st.composite
def route_cases(draw):
    n_experts = draw(st.sampled_from([1, 2, 3, 4, 7, 8, 16, 31, 32, 64, 100, 255, 256]))
    k = draw(st.integers(1, n_experts))
    n_tokens = draw(st.sampled_from([0, 1, 2, 5, 17, 64]))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 30.0]))  # 0: all-equal probabilities (every rank a tie)
    return (
        n_tokens,
        n_experts,
        k,
        scale,
        draw(DTYPES),
        draw(st.sampled_from(["contiguous", "sliced", "transposed"])),
        draw(SEEDS),
    )


@fuzz(60)
@given(route_cases())
def test_route_topk(case):
    n_tokens, n_experts, k, scale, dtype, layout, seed = case
    logits = relayout(randn((n_tokens, n_experts), seed, dtype, scale), layout)
    out = run_or_clear_error("route_topk", ops.route_topk, logits, k)
    if out is None:
        assert layout == "transposed", "route_topk refused a layout with stride(-1) == 1"
        return
    probs, gates, experts, sorted_slots, slot_positions, offsets = out
    r_probs = torch.softmax(logits.contiguous(), dim=-1)
    assert_close(probs.float(), r_probs.float(), dtype=dtype, what="route_topk probs")
    assert gates.dtype == dtype and experts.dtype == torch.int64 and experts.shape == (n_tokens, k)
    assert torch.equal(probs.gather(1, experts), gates)
    # the chosen experts are a top-k set: distinct, and no unchosen probability is larger than a chosen one
    assert all(len(set(row)) == k for row in experts.tolist())
    if n_tokens and k < n_experts:
        unchosen = probs.float().scatter(1, experts, -1.0)
        assert (unchosen.max(-1).values <= gates.float().min(-1).values).all()
    # ties rank the lower expert first: chosen experts are in descending probability, ascending index on ties
    g, e = gates.float(), experts
    assert ((g[:, :-1] > g[:, 1:]) | ((g[:, :-1] == g[:, 1:]) & (e[:, :-1] < e[:, 1:]))).all()
    check_sort(experts, sorted_slots, slot_positions, offsets, n_experts)


# ------------------------------------------------------------------------------------------------------ gather_rows
@fuzz(60)
@given(
    n_rows=st.integers(1, 40),
    width=st.integers(1, 300),
    group=st.integers(1, 8),
    m=st.sampled_from([0, 1, 2, 9, 64]),
    dtype=DTYPES,
    layout=st.sampled_from(["contiguous", "sliced", "transposed", "expanded"]),
    seed=SEEDS,
)
def test_gather_rows(n_rows, width, group, m, dtype, layout, seed):
    if layout == "expanded":  # every row the same memory: stride 0
        x = randn((1, width), seed, dtype).expand(n_rows, width)
    else:
        x = relayout(randn((n_rows, width), seed, dtype), layout)
    index = torch.randint(0, n_rows * group, (m,), generator=torch.Generator().manual_seed(seed))
    out = run_or_clear_error("gather_rows", ops.gather_rows, x, index, group)
    if out is None:
        assert x.stride(-1) != 1 and width > 1, "gather_rows refused a layout it should take"
        return
    assert torch.equal(out, reference.gather_rows_ref(x, index, group))


# ------------------------------------------------------------------------------------------------------ scatter_ksum
@st.composite
def ksum_cases(draw):
    n_experts = draw(st.sampled_from([1, 2, 4, 8, 32, 256]))
    k = draw(st.integers(1, min(n_experts, 8)))
    n_tokens = draw(st.sampled_from([0, 1, 3, 16, 33]))
    width = draw(st.integers(1, 200))
    return (
        n_tokens,
        n_experts,
        k,
        width,
        draw(DTYPES),
        draw(LAYOUTS),
        draw(st.sampled_from(["contiguous", "transposed"])),
        draw(SEEDS),
    )


@fuzz(60)
@given(ksum_cases())
def test_scatter_ksum(case):
    n_tokens, n_experts, k, width, dtype, y_layout, gates_layout, seed = case
    logits = randn((n_tokens, n_experts), seed)
    _, gates, _, _, slot_positions, _ = reference.route_topk_ref(logits, k)
    y = relayout(randn((n_tokens * k, width), seed + 1, dtype), y_layout)
    gates = relayout(gates.to(dtype), gates_layout)
    out = run_or_clear_error("scatter_ksum", ops.scatter_ksum, y, gates, slot_positions)
    if out is None:
        assert y.stride(-1) != 1 and width > 1 or not gates.is_contiguous(), "scatter_ksum refused a valid layout"
        return
    assert out.dtype == dtype and out.shape == (n_tokens, width)
    if n_tokens == 0:  # scatter_ksum_ref's .view(0, k, -1) cannot infer C from 0 elements
        return
    ref = reference.scatter_ksum_ref(y.float(), gates.float(), slot_positions)
    lowp = reference.scatter_ksum_ref(y, gates, slot_positions)
    assert_close(out, ref, lowp, dtype, "scatter_ksum")


# ------------------------------------------------------------------------------------------------------ expert_gemm
@st.composite
def gemm_cases(draw):
    n_experts = draw(st.sampled_from([1, 2, 3, 8, 32, 256]))
    small = n_experts >= 32  # keep E * K * Nout small
    k_in = draw(st.integers(1, 24 if small else 160))
    n_out = draw(st.integers(1, 24 if small else 160))
    n_rows = draw(st.sampled_from([0, 1, 2, 17, 40]))
    skew = draw(st.sampled_from(["random", "one_expert", "last_expert"]))
    return (
        n_experts,
        k_in,
        n_out,
        n_rows,
        skew,
        draw(st.sampled_from(["none", "gelu_new"])),
        draw(DTYPES),
        draw(st.sampled_from(["contiguous", "sliced", "transposed"])),
        draw(st.sampled_from(["contiguous", "sliced", "transposed"])),
        draw(SEEDS),
    )


@fuzz(60)
@given(gemm_cases())
def test_expert_gemm(case):
    n_experts, k_in, n_out, n_rows, skew, activation, dtype, x_layout, w_layout, seed = case
    g = torch.Generator().manual_seed(seed)
    if skew == "random":
        owners = torch.randint(0, n_experts, (n_rows,), generator=g)
    else:
        owners = torch.full((n_rows,), 0 if skew == "one_expert" else n_experts - 1)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(owners, minlength=n_experts).cumsum(0)])
    x = relayout(randn((n_rows, k_in), seed, dtype), x_layout)
    w = relayout(randn((n_experts, k_in, n_out), seed + 1, dtype, k_in**-0.5), w_layout)
    out = run_or_clear_error("expert_gemm", ops.expert_gemm, x, w, offsets, activation)
    if out is None:
        assert x_layout == "transposed" and k_in > 1 and n_rows > 1, "expert_gemm refused a valid layout"
        return
    ref = reference.expert_gemm_ref(x.float(), w.float(), offsets, activation)
    lowp = reference.expert_gemm_ref(x, w, offsets, activation) if dtype != torch.float32 else None
    assert out.dtype == dtype and out.shape == (n_rows, n_out)
    assert_close(out, ref, lowp, dtype, "expert_gemm")


# ------------------------------------------------------------------------------------------------------ sb_attention
FMIN = torch.finfo(torch.float32).min


@st.composite
def sb_cases(draw):
    S = draw(st.sampled_from([1, 2, 3, 8, 17, 40, 130]))
    T = draw(st.sampled_from(sorted({0, 1, 2, S // 2, S})))
    T = min(T, S)
    return (
        draw(st.integers(1, 3)),
        T,
        S,
        draw(st.integers(1, 4)),
        draw(st.integers(1, 3)),
        draw(st.sampled_from([1, 2, 7, 16, 33, 64])),
        draw(st.sampled_from(["none", "zeros", "left_pad"])),
        draw(DTYPES),
        draw(LAYOUTS),
        draw(st.sampled_from(["contiguous", "channels_last", "cache_view", "transposed"])),
        draw(SEEDS),
    )


@fuzz(60)
@given(sb_cases())
def test_sb_attention(case):
    B, T, S, G, H, D, bias_kind, dtype, q_layout, kv_layout, seed = case
    q = relayout(randn((B, T, G, H, D), seed, dtype), q_layout)
    kv = randn((B, S, H, D), seed + 1, dtype)
    if kv_layout == "cache_view":  # a preallocated [B, S_max, H*D] cache, first S positions
        cache = torch.zeros(B, S + 5, H * D, dtype=dtype)
        cache[:, :S] = kv.reshape(B, S, H * D)
        kv = cache[:, :S].unflatten(-1, (H, D))
    else:
        kv = relayout(kv, kv_layout)
    bias = None
    if bias_kind != "none":
        bias = torch.zeros(B, S)
        if bias_kind == "left_pad":
            bias[0, : S // 2] = FMIN  # some query rows of batch 0 see only padding
    scale = D**-0.5
    out = run_or_clear_error("sb_attention", ops.sb_attention, q, kv, kv, bias, scale)
    if out is None:
        assert any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in (q, kv)), "sb_attention refused a valid layout"
        return
    ref = reference.sb_attention_ref(q.float(), kv.float(), kv.float(), bias, scale)
    lowp = reference.sb_attention_ref(q, kv, kv, bias, scale) if dtype != torch.float32 else None
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, lowp, dtype, "sb_attention")


# ------------------------------------------------------------------------------------------------------ malformed
INDEX_VALUES = st.sampled_from([-(2**62), -1, 0, 1, 3, 7, 2**31, 2**62])


@fuzz(80)
@given(
    op=st.sampled_from(["gather_rows", "scatter_ksum", "expert_gemm"]),
    rows=st.integers(0, 6),
    width=st.integers(0, 5),
    n=st.integers(0, 4),
    k=st.integers(0, 3),
    n_experts=st.integers(0, 4),
    index=st.lists(INDEX_VALUES, min_size=0, max_size=8),
    group=st.sampled_from([-1, 0, 1, 2, 2**40]),
    index_dtype=st.sampled_from([torch.int64, torch.int32]),
    seed=SEEDS,
)
def test_malformed_index_inputs(op, rows, width, n, k, n_experts, index, group, index_dtype, seed):
    """Out-of-range, negative, huge or mistyped indices and inconsistent sizes: a clear error or the reference's
    answer, never an out-of-bounds read (the sanitizer job runs this too)."""
    idx = torch.tensor(index, dtype=torch.int64).to(index_dtype)
    x = randn((rows, width), seed)
    if op == "gather_rows":
        out = run_or_clear_error(op, ops.gather_rows, x, idx, group)
        if out is not None:
            assert torch.equal(out, reference.gather_rows_ref(x, idx, group))
    elif op == "scatter_ksum":
        gates = randn((n, k), seed + 1)
        out = run_or_clear_error(op, ops.scatter_ksum, x, gates, idx)
        if out is not None and n * k == 0:  # (the reference cannot reshape 0 slots); no slots sum to zeros
            assert out.shape == (n, width) and not out.any()
        elif out is not None:
            assert torch.equal(out, reference.scatter_ksum_ref(x, gates, idx))
    else:
        w = randn((n_experts, width, 3), seed + 1)
        out = run_or_clear_error(op, ops.expert_gemm, x, w, idx, "none")
        if out is not None:
            assert_close(out, reference.expert_gemm_ref(x, w, idx), what="expert_gemm")


@fuzz(60)
@given(
    q_shape=st.lists(st.integers(0, 4), min_size=3, max_size=6),
    kv_shape=st.lists(st.integers(0, 5), min_size=2, max_size=5),
    bias_shape=st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=1, max_size=3)),
    k=st.integers(-1, 5),
    logits_shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    scale=st.sampled_from([0.0, -1.0, 0.5, float("inf"), float("nan")]),
    seed=SEEDS,
)
def test_malformed_shapes(q_shape, kv_shape, bias_shape, k, logits_shape, scale, seed):
    """Inconsistent ranks and sizes for sb_attention and route_topk: a clear error or a reference-equal result."""
    q, kv = randn(q_shape, seed), randn(kv_shape, seed + 1)
    bias = None if bias_shape is None else torch.zeros(bias_shape)
    out = run_or_clear_error("sb_attention", ops.sb_attention, q, kv, kv, bias, scale)
    if out is not None and scale == scale and abs(scale) != float("inf"):
        assert_close(out, reference.sb_attention_ref(q, kv, kv, bias, scale), what="sb_attention")
    logits = randn(logits_shape, seed + 2)
    out = run_or_clear_error("route_topk", ops.route_topk, logits, k)
    if out is not None:
        assert torch.equal(out[0], torch.softmax(logits, -1))


@fuzz(40)
@given(n_tokens=st.integers(1, 8), n_experts=st.sampled_from([1, 2, 5, 32, 256]), data=st.data(), seed=SEEDS)
def test_route_topk_non_finite_logits(n_tokens, n_experts, data, seed):
    """NaN/Inf router logits (from NaN weights) make NaN gates, but the expert ids must stay a valid, in-range
    routing: they index weights and rows downstream. Finite rows are unaffected."""
    k = data.draw(st.integers(1, n_experts))
    logits = randn((n_tokens, n_experts), seed)
    special = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, n_tokens - 1),
                st.integers(0, n_experts - 1),
                st.sampled_from([float("nan"), float("inf"), -float("inf")]),
            ),
            min_size=1,
            max_size=6,
        )
    )
    for row, col, value in special:
        logits[row, col] = value
    probs, gates, experts, sorted_slots, slot_positions, offsets = ops.route_topk(logits, k)
    assert ((experts >= 0) & (experts < n_experts)).all()
    assert all(len(set(row)) == k for row in experts.tolist())
    check_sort(experts, sorted_slots, slot_positions, offsets, n_experts)
    finite = torch.isfinite(logits).all(-1)
    _, r_gates, r_experts, *_ = reference.route_topk_ref(logits[finite], k)
    assert torch.equal(gates[finite], r_gates)
