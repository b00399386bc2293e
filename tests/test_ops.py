"""Every molm op against its pure-torch twin in molm.reference: values, integers exactly, bitwise repeatability,
opcheck (schema, fakes, autograd registration), input validation, gradients and a torch.compile trace."""

from __future__ import annotations

import re

import pytest
import torch

from molm import ops, reference

from tolerances import FLOORS, assert_close

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason=f"molm._C not built: {ops.extension_error()}")

DTYPES = [torch.float32, torch.bfloat16]
FMIN = torch.finfo(torch.float32).min


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _routing(n_tokens: int, n_experts: int, k: int, seed: int = 0, skew: str = "uniform"):
    logits = torch.randn(n_tokens, n_experts, generator=_gen(seed))
    if skew == "one_expert":  # every token picks expert 0 first
        logits[:, 0] += 100.0
    return reference.route_topk_ref(logits, k)


# ------------------------------------------------------------------------------------------------------ route_topk
ROUTE_CASES = [(1, 1, 1), (1, 32, 2), (3, 4, 4), (64, 16, 2), (257, 32, 1), (100, 8, 8), (5, 257, 3)]


def _check_sort(experts, sorted_slots, slot_positions, expert_offsets, n_experts):
    flat = experts.reshape(-1)
    assert torch.equal(sorted_slots, torch.sort(flat, stable=True).indices)
    assert torch.equal(slot_positions[sorted_slots], torch.arange(flat.numel()))
    counts = torch.bincount(flat, minlength=n_experts)
    assert torch.equal(expert_offsets, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("n_tokens,n_experts,k", ROUTE_CASES)
def test_route_topk(n_tokens, n_experts, k, dtype):
    logits = torch.randn(n_tokens, n_experts, generator=_gen(n_tokens)).to(dtype)
    probs, gates, experts, sorted_slots, slot_positions, offsets = ops.route_topk(logits, k)
    r_probs, r_gates, r_experts, *_ = reference.route_topk_ref(logits, k)
    assert torch.equal(probs, r_probs)  # ATen's softmax: bitwise
    assert torch.equal(gates, r_gates)  # top-k values do not depend on tie order
    assert experts.dtype == torch.int64 and gates.dtype == dtype
    top = torch.sort(r_probs.float(), dim=-1, descending=True).values[:, : k + 1]  # ties among the first k+1
    no_tie = (top[:, :-1] != top[:, 1:]).all(-1)
    assert torch.equal(experts[no_tie], r_experts[no_tie])
    assert torch.equal(probs.gather(1, experts), gates)
    _check_sort(experts, sorted_slots, slot_positions, offsets, n_experts)


def test_route_topk_ties_pick_lower_expert():
    logits = torch.zeros(3, 6)
    logits[1, 4] = logits[1, 2] = 1.0
    _, _, experts, *_ = ops.route_topk(logits, 3)
    assert experts.tolist() == [[0, 1, 2], [2, 4, 0], [0, 1, 2]]


@pytest.mark.parametrize("skew", ["one_expert", "uniform"])
def test_route_topk_all_on_one_and_empty_experts(skew):
    logits = torch.randn(40, 32, generator=_gen(3))
    if skew == "one_expert":
        logits[:, 5] += 100.0
    _, _, experts, sorted_slots, slot_positions, offsets = ops.route_topk(logits, 1)
    _check_sort(experts, sorted_slots, slot_positions, offsets, 32)
    if skew == "one_expert":
        assert offsets.tolist() == [0] * 6 + [40] * 27


# ------------------------------------------------------------------------------------------------------ gather_rows
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n_rows,width,group,m", [(1, 8, 1, 1), (5, 33, 2, 10), (7, 1024, 4, 28), (3, 12, 1, 0), (16, 64, 1, 40)]
)
def test_gather_rows(n_rows, width, group, m, dtype):
    x = torch.randn(n_rows, width, generator=_gen()).to(dtype)
    index = torch.randint(0, n_rows * group, (m,), generator=_gen(1))
    assert torch.equal(ops.gather_rows(x, index, group), reference.gather_rows_ref(x, index, group))


def test_gather_rows_strided_source():
    x = torch.randn(6, 20, generator=_gen())[:, 2:14]  # row stride 20, stride(-1) == 1
    index = torch.tensor([5, 0, 3, 3])
    assert torch.equal(ops.gather_rows(x, index), reference.gather_rows_ref(x, index))


# ------------------------------------------------------------------------------------------------------ scatter_ksum
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n_tokens,n_experts,k,width", [(1, 4, 1, 8), (1, 32, 2, 1024), (37, 8, 3, 33), (64, 16, 4, 64), (9, 4, 4, 12)]
)
def test_scatter_ksum(n_tokens, n_experts, k, width, dtype):
    _, gates, _, _, slot_positions, _ = _routing(n_tokens, n_experts, k)
    y = torch.randn(n_tokens * k, width, generator=_gen(2)).to(dtype)
    gates = gates.to(dtype)
    out = ops.scatter_ksum(y, gates, slot_positions)
    ref = reference.scatter_ksum_ref(y, gates, slot_positions)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


# ------------------------------------------------------------------------------------------------------ expert_gemm
# (M per expert pattern, K, Nout): empty experts, all rows on one expert, GEMV (<= 16 rows) and at::mm segments
GEMM_CASES = [
    ([1, 0, 2, 0], 64, 128),
    ([0, 0, 40, 0], 33, 50),
    ([3, 17, 0, 5], 48, 40),
    ([16, 1, 4, 2], 256, 72),
    ([0, 0, 0, 0], 16, 24),
    ([2], 1024, 2048),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "gelu_new"])
@pytest.mark.parametrize("rows,k_in,n_out", GEMM_CASES)
def test_expert_gemm(rows, k_in, n_out, activation, dtype):
    offsets = torch.tensor([0] + rows).cumsum(0)
    x = torch.randn(sum(rows), k_in, generator=_gen()).to(dtype)
    weight = (torch.randn(len(rows), k_in, n_out, generator=_gen(1)) * k_in**-0.5).to(dtype)
    out = ops.expert_gemm(x, weight, offsets, activation)
    ref = reference.expert_gemm_ref(x.float(), weight.float(), offsets, activation)
    lowp = reference.expert_gemm_ref(x, weight, offsets, activation) if dtype != torch.float32 else None
    assert out.dtype == dtype
    assert_close(out, ref, lowp, dtype, "expert_gemm")


def test_expert_gemm_transposed_weight_view():
    offsets = torch.tensor([0, 3, 3, 30])
    x = torch.randn(30, 24, generator=_gen())
    w_t = torch.randn(3, 40, 24, generator=_gen(1))  # [E, Nout, K] contiguous; pass [E, K, Nout] view
    out = ops.expert_gemm(x, w_t.transpose(1, 2), offsets)
    assert_close(out, reference.expert_gemm_ref(x, w_t.transpose(1, 2), offsets), what="expert_gemm mT")


# ------------------------------------------------------------------------------------------------------ sb_attention
# (B, T, S, k slots, H, D)
SB_CASES = [
    (1, 1, 1, 1, 1, 64),
    (2, 1, 7, 2, 1, 12),
    (1, 1, 97, 4, 4, 12),
    (1, 1, 1025, 2, 1, 64),
    (3, 1, 600, 2, 1, 1024),
    (2, 3, 9, 1, 4, 16),
    (2, 7, 7, 3, 2, 12),
    (1, 97, 97, 2, 1, 64),
    (2, 20, 1025, 2, 1, 12),
    (1, 130, 130, 1, 4, 48),
]


def _sb_inputs(B, T, S, G, H, D, dtype, padded, seed=0):
    g = _gen(seed)
    q = torch.randn(B, T, G, H, D, generator=g)
    k = torch.randn(B, S, H, D, generator=g)
    v = torch.randn(B, S, H, D, generator=g)
    bias = None
    if padded:
        bias = torch.zeros(B, S)
        bias[0, : S // 2] = FMIN  # left padding; with T > S/2 some query rows are fully padded
        bias[-1, : min(S - 1, 3)] = FMIN
    return q.to(dtype), k.to(dtype), v.to(dtype), bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("B,T,S,G,H,D", SB_CASES)
def test_sb_attention(B, T, S, G, H, D, padded, dtype):
    q, k, v, bias = _sb_inputs(B, T, S, G, H, D, dtype, padded)
    scale = D**-0.5
    out = ops.sb_attention(q, k, v, bias, scale)
    ref = reference.sb_attention_ref(q.float(), k.float(), v.float(), bias, scale)
    lowp = reference.sb_attention_ref(q, k, v, bias, scale) if dtype != torch.float32 else None
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, lowp, dtype, "sb_attention")
    if padded and T > S // 2:  # fully padded query rows of batch 0 get exactly nothing
        n_dead = S // 2 - (S - T)
        assert torch.all(out[0, :n_dead] == 0)


def test_sb_attention_shared_kv_and_strided_cache():
    cache = torch.randn(2, 50, 3 * 32, generator=_gen())  # [B, S_max, H*D] preallocated, use the first 40
    kv = cache[:, :40].view(2, 40, 3, 32) if cache[:, :40].is_contiguous() else cache[:, :40].unflatten(-1, (3, 32))
    q = torch.randn(2, 1, 2, 3, 32, generator=_gen(1))
    out = ops.sb_attention(q, kv, kv, None, 32**-0.5)
    assert_close(out, reference.sb_attention_ref(q, kv, kv, None, 32**-0.5), what="sb strided")


def test_sb_attention_left_padding_invariance():
    q, k, v, _ = _sb_inputs(1, 5, 12, 2, 1, 16, torch.float32, False)
    pad = 4
    kp = torch.cat([torch.randn(1, pad, 1, 16), k], 1)
    vp = torch.cat([torch.randn(1, pad, 1, 16), v], 1)
    bias = torch.zeros(1, 12 + pad)
    bias[:, :pad] = FMIN
    torch.testing.assert_close(ops.sb_attention(q, kp, vp, bias, 0.25), ops.sb_attention(q, k, v, None, 0.25))


# ------------------------------------------------------------------------------------------------------ bitwise
def _all_ops_inputs(dtype=torch.float32, seed=0):
    g = _gen(seed)
    logits = torch.randn(6, 4, generator=g, dtype=dtype)
    _, gates, _, sorted_slots, slot_positions, offsets = reference.route_topk_ref(logits, 2)
    h = torch.randn(6, 8, generator=g, dtype=dtype)
    y = torch.randn(12, 8, generator=g, dtype=dtype)
    w = torch.randn(4, 8, 5, generator=g, dtype=dtype)
    q = torch.randn(2, 3, 2, 1, 8, generator=g, dtype=dtype)
    kv = torch.randn(2, 5, 1, 8, generator=g, dtype=dtype)
    bias = torch.zeros(2, 5, dtype=dtype)
    bias[0, :2] = torch.finfo(dtype).min
    return dict(
        route_topk=(logits, 2),
        gather_rows=(h, sorted_slots, 2),
        scatter_ksum=(y, gates, slot_positions),
        expert_gemm=(y, w, offsets, "gelu_new"),
        sb_attention=(q, kv, kv.clone(), bias, 0.35),
    )


@pytest.mark.parametrize("name", ["route_topk", "gather_rows", "scatter_ksum", "expert_gemm", "sb_attention"])
def test_bitwise_repeatable(name):
    args = _all_ops_inputs()[name]
    a, b = getattr(ops, name)(*args), getattr(ops, name)(*args)
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x, y)


def test_bitwise_repeatable_large():
    q, k, v, bias = _sb_inputs(1, 1, 2000, 2, 1, 256, torch.float32, True)
    assert torch.equal(ops.sb_attention(q, k, v, bias, 0.1), ops.sb_attention(q, k, v, bias, 0.1))
    q, k, v, bias = _sb_inputs(1, 40, 300, 2, 1, 64, torch.bfloat16, True)
    assert torch.equal(ops.sb_attention(q, k, v, bias, 0.1), ops.sb_attention(q, k, v, bias, 0.1))
    x = torch.randn(20, 512)
    w = torch.randn(3, 512, 256)
    off = torch.tensor([0, 2, 7, 20])
    assert torch.equal(ops.expert_gemm(x, w, off), ops.expert_gemm(x, w, off))


# ------------------------------------------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("name", ["route_topk", "gather_rows", "scatter_ksum", "expert_gemm", "sb_attention"])
def test_opcheck(name):
    args = list(_all_ops_inputs()[name])
    if name in ("scatter_ksum", "expert_gemm", "sb_attention"):
        args[0] = args[0].requires_grad_()
    if name == "expert_gemm":
        args[1] = args[1].requires_grad_()
    torch.library.opcheck(getattr(torch.ops.molm, name).default, tuple(args))


def test_opcheck_wgrad():
    x, g = torch.randn(7, 5), torch.randn(7, 3)
    torch.library.opcheck(torch.ops.molm.expert_gemm_wgrad.default, (x, g, torch.tensor([0, 2, 2, 7]), 3))


def test_torch_compile_fullgraph():
    def layer(logits, h, w1, w2, q, kv, bias):
        _, gates, _, sorted_slots, slot_positions, offsets = ops.route_topk(logits, 2)
        x = ops.gather_rows(h, sorted_slots, 2)
        x = ops.expert_gemm(x, w1, offsets, "gelu_new")
        y = ops.expert_gemm(x, w2, offsets, "none")
        o = ops.sb_attention(q, kv, kv, bias, 0.3)
        return ops.scatter_ksum(y, gates, slot_positions), o

    g = _gen()
    args = (
        torch.randn(6, 4, generator=g),
        torch.randn(6, 8, generator=g),
        torch.randn(4, 8, 16, generator=g),
        torch.randn(4, 16, 8, generator=g),
        torch.randn(2, 3, 2, 1, 8, generator=g),
        torch.randn(2, 5, 1, 8, generator=g),
        torch.zeros(2, 5),
    )
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(*args), layer(*args)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------ bad inputs
BAD = [
    ("route_topk", lambda: (torch.randn(3, 4, 2), 1), ValueError, "rank"),
    ("route_topk", lambda: (torch.randn(3, 4), 5), ValueError, "k must be in"),
    ("route_topk", lambda: (torch.randn(3, 4), 0), ValueError, "k must be in"),
    ("route_topk", lambda: (torch.zeros(3, 4, dtype=torch.int32), 1), TypeError, "logits must be float32"),
    ("gather_rows", lambda: (torch.randn(3, 4), torch.tensor([0, 3]), 1), ValueError, "out of range"),
    ("gather_rows", lambda: (torch.randn(3, 4), torch.tensor([-1]), 1), ValueError, "out of range"),
    ("gather_rows", lambda: (torch.randn(3, 4), torch.tensor([0], dtype=torch.int32), 1), TypeError, "int64"),
    ("gather_rows", lambda: (torch.randn(3, 4), torch.tensor([0]), 0), ValueError, "group"),
    ("gather_rows", lambda: (torch.randn(4, 3).t(), torch.tensor([0]), 1), ValueError, "stride"),
    ("scatter_ksum", lambda: (torch.randn(6, 4), torch.randn(2, 2), torch.arange(6)), ValueError, "N*k"),
    (
        "scatter_ksum",
        lambda: (torch.randn(4, 4), torch.randn(2, 2), torch.tensor([0, 1, 2, 9])),
        ValueError,
        "out of range",
    ),
    (
        "expert_gemm",
        lambda: (torch.randn(4, 8), torch.randn(2, 7, 3), torch.tensor([0, 2, 4]), "none"),
        ValueError,
        "K ==",
    ),
    (
        "expert_gemm",
        lambda: (torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([0, 2, 5]), "none"),
        ValueError,
        "expert_offsets",
    ),
    (
        "expert_gemm",
        lambda: (torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([0, 4]), "none"),
        ValueError,
        "E + 1",
    ),
    (
        "expert_gemm",
        lambda: (torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([0, 2, 4]), "relu"),
        ValueError,
        "activation",
    ),
    (
        "expert_gemm",
        lambda: (torch.randn(4, 8), torch.randn(2, 8, 3).double(), torch.tensor([0, 2, 4]), "none"),
        TypeError,
        "dtype",
    ),
    (
        "sb_attention",
        lambda: (torch.randn(1, 2, 2, 1, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8), None, 1.0),
        ValueError,
        "rank",
    ),
    (
        "sb_attention",
        lambda: (torch.randn(1, 4, 2, 1, 8), torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8), None, 1.0),
        ValueError,
        "T <= S",
    ),
    (
        "sb_attention",
        lambda: (torch.randn(1, 1, 2, 1, 8), torch.randn(1, 3, 1, 6), torch.randn(1, 3, 1, 6), None, 1.0),
        ValueError,
        "B, H and D",
    ),
    (
        "sb_attention",
        lambda: (torch.randn(1, 1, 2, 1, 8), torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8), torch.zeros(1, 4), 1.0),
        ValueError,
        "bias",
    ),
    (
        "sb_attention",
        lambda: (torch.randn(1, 1, 2, 1, 8), torch.randn(1, 3, 1, 8).half(), torch.randn(1, 3, 1, 8), None, 1.0),
        TypeError,
        "dtype",
    ),
]


@pytest.mark.parametrize("name,make,exc,needle", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs(name, make, exc, needle):
    with pytest.raises(exc, match=re.escape(needle)) as info:
        getattr(ops, name)(*make())
    assert f"molm::{name}" in str(info.value)


# ------------------------------------------------------------------------------------------------------ gradients
def test_grad_route_topk():
    logits = torch.randn(5, 6, dtype=torch.float64, generator=_gen()).requires_grad_()
    torch.autograd.gradcheck(lambda x: ops.route_topk(x, 2)[:2], (logits,))


@pytest.mark.parametrize("group", [1, 3])
def test_grad_gather_rows(group):
    x = torch.randn(4, 5, dtype=torch.float64, generator=_gen()).requires_grad_()
    index = torch.tensor([11, 0, 1, 5, 5, 2, 7])[: 4 * group if group > 1 else 4] % (4 * group)
    torch.autograd.gradcheck(lambda x: ops.gather_rows(x, index, group), (x,))


def test_grad_scatter_ksum():
    _, gates, _, _, slot_positions, _ = _routing(5, 4, 3)
    y = torch.randn(15, 6, dtype=torch.float64, generator=_gen()).requires_grad_()
    gates = gates.double().requires_grad_()
    torch.autograd.gradcheck(lambda y, g: ops.scatter_ksum(y, g, slot_positions), (y, gates))


@pytest.mark.parametrize("activation", ["none", "gelu_new"])
def test_grad_expert_gemm(activation):
    offsets = torch.tensor([0, 2, 2, 9, 10])
    x = torch.randn(10, 6, dtype=torch.float64, generator=_gen()).requires_grad_()
    w = torch.randn(4, 6, 5, dtype=torch.float64, generator=_gen(1)).requires_grad_()
    torch.autograd.gradcheck(lambda x, w: ops.expert_gemm(x, w, offsets, activation), (x, w))


def test_grad_expert_gemm_fp32_vs_reference():
    offsets = torch.tensor([0, 20, 20, 23])
    x = torch.randn(23, 32, generator=_gen()).requires_grad_()
    w = torch.randn(3, 32, 16, generator=_gen(1)).requires_grad_()
    dy = torch.randn(23, 16, generator=_gen(2))
    got = torch.autograd.grad(ops.expert_gemm(x, w, offsets, "gelu_new"), (x, w), dy)
    want = torch.autograd.grad(reference.expert_gemm_ref(x, w, offsets, "gelu_new"), (x, w), dy)
    for a, b in zip(got, want):
        assert_close(a, b, what="expert_gemm grad")


@pytest.mark.parametrize("B,T,S,G,H,D", [(2, 3, 5, 2, 1, 4), (1, 1, 6, 2, 2, 3)])
def test_grad_sb_attention(B, T, S, G, H, D):
    q, k, v, bias = _sb_inputs(B, T, S, G, H, D, torch.float64, True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.autograd.gradcheck(lambda q, k, v: ops.sb_attention(q, k, v, bias.double(), 0.5), (q, k, v))


def test_grad_layer_vs_reference():
    """A whole MoE/MoA-shaped chain in fp32: gradients of every input vs the reference ops."""
    g = _gen()
    logits = torch.randn(6, 4, generator=g).requires_grad_()
    h = torch.randn(6, 8, generator=g).requires_grad_()
    w = torch.randn(4, 8, 8, generator=g).requires_grad_()
    q = torch.randn(2, 3, 2, 1, 8, generator=g).requires_grad_()
    kv = torch.randn(2, 3, 1, 8, generator=g).requires_grad_()

    def chain(mod, suffix):
        route = getattr(mod, "route_topk" + suffix)
        _, gates, _, ss, sp, off = route(logits, 2)
        x = getattr(mod, "gather_rows" + suffix)(h, ss, 2)
        y = getattr(mod, "expert_gemm" + suffix)(x, w, off, "gelu_new")
        o = getattr(mod, "sb_attention" + suffix)(q, kv, kv, None, 0.3)
        return getattr(mod, "scatter_ksum" + suffix)(y, gates, sp).sum() + (o**2).sum()

    got = torch.autograd.grad(chain(ops, ""), (logits, h, w, q, kv))
    want = torch.autograd.grad(chain(reference, "_ref"), (logits, h, w, q, kv))
    for a, b in zip(got, want):
        assert_close(a, b, dtype=torch.float32, what="chain grad")


def test_floors_cover_test_dtypes():
    assert all(d in FLOORS for d in DTYPES)
