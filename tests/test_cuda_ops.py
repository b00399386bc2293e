"""The CUDA kernels (csrc/cuda/) against the pure-torch reference ops on the same device: the CPU tests' edge cases
plus sizes that reach every CUDA path (decode GEMV, WMMA and SIMT tiles, vectorised and scalar rows), integers
exactly, bitwise repeatability, CUDA-graph capture (no host sync), gradients, and bad inputs. Skipped without a GPU."""

from __future__ import annotations

import re

import pytest
import torch

from molm import ops, reference

from tolerances import assert_close

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not ops.extension_available(), reason=f"molm._C not built: {ops.extension_error()}"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    """Random data drawn on the CPU (same numbers on every machine), moved to the GPU."""
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype).to(DEV)


@pytest.fixture(autouse=True)
def _require_cuda_kernels():
    for name in ("route_topk", "gather_rows", "scatter_ksum", "expert_gemm", "expert_gemm_wgrad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"molm::{name}", "CUDA"), f"no CUDA kernel for {name}"


def _check_sort(experts, sorted_slots, slot_positions, expert_offsets, n_experts):
    flat = experts.reshape(-1).cpu()
    sorted_slots, slot_positions, expert_offsets = sorted_slots.cpu(), slot_positions.cpu(), expert_offsets.cpu()
    assert torch.equal(sorted_slots, torch.sort(flat, stable=True).indices)
    assert torch.equal(slot_positions[sorted_slots], torch.arange(flat.numel()))
    counts = torch.bincount(flat, minlength=n_experts)
    assert torch.equal(expert_offsets, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))


# ------------------------------------------------------------------------------------------------------ route_topk
# (N, E, k): the CPU cases, k == E, N = 0, and N spanning many 64-token chunks
ROUTE_CASES = [
    (1, 1, 1),
    (1, 32, 2),
    (3, 4, 4),
    (64, 16, 2),
    (257, 32, 1),
    (100, 8, 8),
    (5, 257, 3),
    (0, 8, 2),
    (65, 32, 32),
    (4096, 32, 2),
    (5000, 16, 4),
]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("n_tokens,n_experts,k", ROUTE_CASES)
def test_route_topk(n_tokens, n_experts, k, dtype):
    logits = _randn(n_tokens, n_experts, seed=n_tokens, dtype=dtype)
    probs, gates, experts, sorted_slots, slot_positions, offsets = ops.route_topk(logits, k)
    r_probs, r_gates, r_experts, *_ = reference.route_topk_ref(logits, k)
    assert probs.is_cuda and experts.dtype == torch.int64 and gates.dtype == dtype
    assert torch.equal(probs, r_probs)  # ATen's CUDA softmax: bitwise
    assert torch.equal(gates, r_gates)
    top = torch.sort(r_probs.float(), dim=-1, descending=True).values[:, : k + 1]  # ties among the first k+1
    no_tie = (top[:, :-1] != top[:, 1:]).all(-1)
    assert torch.equal(experts[no_tie], r_experts[no_tie])
    assert torch.equal(probs.gather(1, experts), gates)
    _check_sort(experts, sorted_slots, slot_positions, offsets, n_experts)


def test_route_topk_matches_cpu_kernel():
    logits = torch.randn(300, 32, generator=_gen(7))
    cpu = ops.route_topk(logits, 4)
    gpu = ops.route_topk(logits.to(DEV), 4)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0])  # softmax: CPU and CUDA ATen may differ in the last bit
    assert torch.equal(cpu[2], gpu[2].cpu())  # random fp32 logits: no near-ties, so the same choices
    for a, b in zip(cpu[3:], gpu[3:]):  # and then the same integers from both counting sorts
        assert torch.equal(a, b.cpu())


def test_route_topk_ties_pick_lower_expert():
    logits = torch.zeros(3, 6, device=DEV)
    logits[1, 4] = logits[1, 2] = 1.0
    _, _, experts, *_ = ops.route_topk(logits, 3)
    assert experts.tolist() == [[0, 1, 2], [2, 4, 0], [0, 1, 2]]


def test_route_topk_nan_ranks_first():
    logits = torch.randn(4, 5, generator=_gen()).to(DEV)
    logits[2, 3] = float("nan")
    cpu = ops.route_topk(logits.cpu(), 2)
    gpu = ops.route_topk(logits, 2)
    assert torch.equal(cpu[2], gpu[2].cpu())


@pytest.mark.parametrize("skew", ["one_expert", "uniform"])
def test_route_topk_all_on_one_and_empty_experts(skew):
    logits = torch.randn(4000, 32, generator=_gen(3))
    if skew == "one_expert":
        logits[:, 5] += 100.0
    _, _, experts, sorted_slots, slot_positions, offsets = ops.route_topk(logits.to(DEV), 1)
    _check_sort(experts, sorted_slots, slot_positions, offsets, 32)
    if skew == "one_expert":
        assert offsets.tolist() == [0] * 6 + [4000] * 27


# ------------------------------------------------------------------------------------------------------ gather_rows
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize(
    "n_rows,width,group,m",
    [
        (1, 8, 1, 1),
        (5, 33, 2, 10),
        (7, 1024, 4, 28),
        (3, 12, 1, 0),
        (16, 64, 1, 40),
        (4096, 1024, 2, 8192),
        (9, 7, 3, 27),
    ],
)
def test_gather_rows(n_rows, width, group, m, dtype):
    x = _randn(n_rows, width, dtype=dtype)
    index = torch.randint(0, n_rows * group, (m,), generator=_gen(1)).to(DEV)
    assert torch.equal(ops.gather_rows(x, index, group), reference.gather_rows_ref(x, index, group))


@pytest.mark.parametrize("start", [2, 8])  # start 2: rows misaligned for 16-byte vectors; 8: aligned
def test_gather_rows_strided_source(start):
    x = _randn(6, 40)[:, start : start + 16]  # row stride 40, stride(-1) == 1
    index = torch.tensor([5, 0, 3, 3], device=DEV)
    assert torch.equal(ops.gather_rows(x, index), reference.gather_rows_ref(x, index))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_gradient_is_bitwise_repeatable(dtype):
    """Many rows read the same source row: their gradients are summed in a fixed order (no float atomics)."""
    x = _randn(64, 256, dtype=dtype).requires_grad_(True)
    index = torch.randint(0, 64 * 2, (8192,), generator=_gen(3)).to(DEV)
    grad = _randn(8192, 256, seed=4, dtype=dtype)
    first = torch.autograd.grad(ops.gather_rows(x, index, 2), x, grad)[0]
    for _ in range(3):
        assert torch.equal(torch.autograd.grad(ops.gather_rows(x, index, 2), x, grad)[0], first)
    dense = torch.zeros(64, 8192, dtype=torch.float64, device=DEV)
    dense[torch.div(index, 2, rounding_mode="floor"), torch.arange(8192, device=DEV)] = 1.0
    assert_close(first, dense @ grad.double(), dtype=dtype, what="gather_rows grad")


# ------------------------------------------------------------------------------------------------------ scatter_ksum
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n_tokens,n_experts,k,width",
    [(1, 4, 1, 8), (1, 32, 2, 1024), (37, 8, 3, 33), (64, 16, 4, 64), (9, 4, 4, 12), (4096, 32, 2, 1024)],
)
def test_scatter_ksum(n_tokens, n_experts, k, width, dtype):
    _, gates, _, _, slot_positions, _ = reference.route_topk_ref(_randn(n_tokens, n_experts), k)
    y = _randn(n_tokens * k, width, seed=2, dtype=dtype)
    gates = gates.to(dtype)
    out = ops.scatter_ksum(y, gates, slot_positions)
    ref = reference.scatter_ksum_ref(y, gates, slot_positions)
    assert out.dtype == dtype and out.shape == (n_tokens, width)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


def test_scatter_ksum_no_tokens():
    out = ops.scatter_ksum(_randn(0, 8), _randn(0, 2), torch.empty(0, dtype=torch.int64, device=DEV))
    assert out.shape == (0, 8) and out.is_cuda


def test_scatter_ksum_strided_y_and_fp32_gates():
    _, gates, _, _, slot_positions, _ = reference.route_topk_ref(_randn(10, 4), 2)
    y = _randn(20, 50, dtype=torch.bfloat16)[:, 3:35]  # misaligned rows -> scalar path
    out = ops.scatter_ksum(y, gates, slot_positions)  # fp32 gates with bf16 y
    torch.testing.assert_close(out, reference.scatter_ksum_ref(y, gates, slot_positions), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------ expert_gemm
# (rows per expert, K, Nout). M <= 32 takes the decode GEMV; larger M the tiled kernels (WMMA for 16-bit).
GEMM_CASES = [
    ([1, 0, 2, 0], 64, 128),
    ([0, 0, 40, 0], 33, 50),
    ([3, 17, 0, 5], 48, 40),
    ([16, 1, 4, 2], 256, 72),
    ([0, 0, 0, 0], 16, 24),
    ([2], 1024, 2048),
    ([1, 1], 1024, 2048),
    ([9, 0, 3], 100, 36),  # GEMV: a segment of > 8 rows, Nout not a multiple of 8 (scalar weight loads)
    ([100, 0, 37, 300], 256, 320),
    ([0, 513, 0, 1], 64, 130),
    ([130, 0, 0, 0, 127], 1024, 2048),
    ([5] * 32, 24, 8),
]


def _gemm_inputs(rows, k_in, n_out, dtype, seed=0):
    offsets = torch.tensor([0] + rows).cumsum(0).to(DEV)
    x = _randn(sum(rows), k_in, seed=seed, dtype=dtype)
    weight = _randn(len(rows), k_in, n_out, seed=seed + 1, dtype=dtype, scale=k_in**-0.5)
    return x, weight, offsets


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("activation", ["none", "gelu_new"])
@pytest.mark.parametrize("rows,k_in,n_out", GEMM_CASES)
def test_expert_gemm(rows, k_in, n_out, activation, dtype):
    x, weight, offsets = _gemm_inputs(rows, k_in, n_out, dtype)
    out = torch.full((sum(rows), n_out), float("nan"), device=DEV, dtype=dtype)  # poison the allocator's block
    del out
    out = ops.expert_gemm(x, weight, offsets, activation)
    ref = reference.expert_gemm_ref(x.double(), weight.double(), offsets, activation)
    lowp = reference.expert_gemm_ref(x, weight, offsets, activation) if dtype != torch.float32 else None
    assert out.dtype == dtype and not out.isnan().any()
    assert_close(out, ref, lowp, dtype, "expert_gemm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [30, 300])  # small M with a transposed view still takes the tiled kernel
def test_expert_gemm_transposed_weight_view(m, dtype):
    offsets = torch.tensor([0, 3, 3, m], device=DEV)
    x = _randn(m, 24, dtype=dtype)
    w_t = _randn(3, 40, 24, seed=1, dtype=dtype)  # [E, Nout, K] contiguous; pass [E, K, Nout] view
    out = ops.expert_gemm(x, w_t.transpose(1, 2), offsets)
    ref = reference.expert_gemm_ref(x.double(), w_t.transpose(1, 2).double(), offsets)
    assert_close(out, ref, dtype=dtype, what="expert_gemm mT")


def test_expert_gemm_fp64():
    x, weight, offsets = _gemm_inputs([20, 0, 45], 37, 19, torch.float64)
    out = ops.expert_gemm(x, weight, offsets, "gelu_new")
    assert_close(out, reference.expert_gemm_ref(x, weight, offsets, "gelu_new"), what="expert_gemm fp64")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("rows,k_in,n_out", [([3, 0, 17, 5], 48, 40), ([200, 1, 0, 90], 130, 260), ([0, 0], 8, 8)])
def test_expert_gemm_wgrad(rows, k_in, n_out, dtype):
    x, _, offsets = _gemm_inputs(rows, k_in, n_out, dtype)
    g = _randn(sum(rows), n_out, seed=5, dtype=dtype)
    got = torch.ops.molm.expert_gemm_wgrad(x, g, offsets, len(rows))
    bounds = offsets.tolist()
    want = torch.stack([x[a:b].double().T @ g[a:b].double() for a, b in zip(bounds[:-1], bounds[1:])])
    assert got.dtype == dtype and got.shape == (len(rows), k_in, n_out)
    assert_close(got, want, dtype=dtype, what="expert_gemm_wgrad")
    assert torch.equal(got, torch.ops.molm.expert_gemm_wgrad(x, g, offsets, len(rows)))  # bitwise repeatable


def test_expert_gemm_wgrad_strided_x():
    x = _randn(30, 64)[:, ::2]  # stride(-1) == 2 is allowed for wgrad
    g = _randn(30, 16, seed=1)
    offsets = torch.tensor([0, 10, 30], device=DEV)
    got = torch.ops.molm.expert_gemm_wgrad(x, g, offsets, 2)
    want = torch.stack([x[:10].T @ g[:10], x[10:].T @ g[10:]])
    assert_close(got, want, what="wgrad strided")


# ------------------------------------------------------------------------------------------------------ sm_90a CUTLASS
# The CUTLASS grouped GEMM (csrc/cuda/expert_gemm_sm90.cu) runs on compute capability 9.x for bf16/fp16 with M above
# the GEMV range with set_kernel_options(sm90_gemm="on") (default: M >= 256); "off" forces the WMMA tiles. Elsewhere
# both settings take the WMMA tiles, so the tests still hold. Cases: empty experts, M_e not a multiple of the 128-row
# tile, the MoLM-350M shapes, 32 experts, and K/Nout not multiples of 8 (declined by the TMA path, falls back).
SM90_CASES = [
    ([100, 0, 37, 300], 256, 320),
    ([130, 0, 0, 0, 127], 1024, 2048),
    ([0, 513, 0, 1], 64, 128),
    ([40] + [0] * 7, 32, 16),
    ([7] * 32, 1024, 1024),
    ([0, 513, 0, 1], 64, 130),
    ([33, 31], 36, 64),
]


@pytest.mark.parametrize("sm90", ["on", "off"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["none", "gelu_new"])
@pytest.mark.parametrize("rows,k_in,n_out", SM90_CASES)
def test_expert_gemm_sm90_switch(rows, k_in, n_out, activation, dtype, sm90, kernel_options):
    kernel_options(sm90_gemm=sm90)
    x, weight, offsets = _gemm_inputs(rows, k_in, n_out, dtype, seed=5)
    out = torch.full((sum(rows), n_out), float("nan"), device=DEV, dtype=dtype)  # poison the allocator's block
    del out
    out = ops.expert_gemm(x, weight, offsets, activation)
    ref = reference.expert_gemm_ref(x.double(), weight.double(), offsets, activation)
    lowp = reference.expert_gemm_ref(x, weight, offsets, activation)
    assert out.dtype == dtype and not out.isnan().any()
    assert_close(out, ref, lowp, dtype, f"expert_gemm sm90={sm90}")
    assert torch.equal(out, ops.expert_gemm(x, weight, offsets, activation))  # no split-K: bitwise repeatable


def test_expert_gemm_sm90_on_and_off_agree():
    """Both paths accumulate in fp32 and round once: they differ by at most a bf16 rounding of nearly equal sums."""
    x, weight, offsets = _gemm_inputs([300, 0, 700, 24], 1024, 2048, torch.bfloat16, seed=6)
    with ops.kernel_options_scope(sm90_gemm="on"):
        on = ops.expert_gemm(x, weight, offsets, "gelu_new").float()
    with ops.kernel_options_scope(sm90_gemm="off"):
        off = ops.expert_gemm(x, weight, offsets, "gelu_new").float()
    torch.testing.assert_close(on, off, rtol=2**-7, atol=2e-3)


def test_expert_gemm_sm90_cuda_graph(kernel_options):
    """The device-side problem setup needs no host sync: the sm90 path captures, and replays with new offsets."""
    kernel_options(sm90_gemm="on")
    x, weight, offsets = _gemm_inputs([200, 56, 0, 256], 256, 512, torch.bfloat16, seed=7)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.expert_gemm(x, weight, offsets, "gelu_new")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.expert_gemm(x, weight, offsets, "gelu_new")
    offsets.copy_(torch.tensor([0, 0, 300, 400, 512], device=DEV))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ops.expert_gemm(x, weight, offsets, "gelu_new"))
    ref = reference.expert_gemm_ref(x.double(), weight.double(), offsets, "gelu_new")
    assert_close(captured, ref, dtype=torch.bfloat16, what="expert_gemm sm90 graph replay")


# ---------------------------------------------------------------------------------------------------- bitwise / graphs
def _moe_layer(logits, h, w1, w2, k):
    _, gates, _, sorted_slots, slot_positions, offsets = ops.route_topk(logits, k)
    x = ops.gather_rows(h, sorted_slots, k)
    x = ops.expert_gemm(x, w1, offsets, "gelu_new")
    y = ops.expert_gemm(x, w2, offsets, "none")
    return ops.scatter_ksum(y, gates, slot_positions)


def _layer_inputs(n_tokens, dtype, e=8, c=256, d=512):
    return (
        _randn(n_tokens, e, seed=1),
        _randn(n_tokens, c, seed=2, dtype=dtype),
        _randn(e, c, d, seed=3, dtype=dtype, scale=c**-0.5),
        _randn(e, d, c, seed=4, dtype=dtype, scale=d**-0.5),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens", [4, 1000])
def test_moe_layer_bitwise_repeatable_and_vs_reference(n_tokens, dtype):
    logits, h, w1, w2 = _layer_inputs(n_tokens, dtype)
    a, b = _moe_layer(logits, h, w1, w2, 2), _moe_layer(logits, h, w1, w2, 2)
    assert torch.equal(a, b)
    _, gates, _, ss, sp, off = reference.route_topk_ref(logits, 2)
    x = reference.gather_rows_ref(h.double(), ss, 2)
    y = reference.expert_gemm_ref(reference.expert_gemm_ref(x, w1.double(), off, "gelu_new"), w2.double(), off)
    assert_close(a, reference.scatter_ksum_ref(y, gates.double(), sp), dtype=dtype, what="moe layer")


def test_cuda_graph_capture():
    """No op synchronises with the host: the whole layer captures into a graph, and replays equal eager runs."""
    logits, h, w1, w2 = _layer_inputs(64, torch.bfloat16)
    eager = _moe_layer(logits, h, w1, w2, 2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _moe_layer(logits, h, w1, w2, 2)  # warm up on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _moe_layer(logits, h, w1, w2, 2)
    logits.copy_(_randn(64, 8, seed=11))  # new routing, same shapes
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, _moe_layer(logits, h, w1, w2, 2))
    assert not torch.equal(captured, eager)


# ------------------------------------------------------------------------------------------------------ gradients
def test_grad_route_topk():
    logits = _randn(5, 6, dtype=torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda x: ops.route_topk(x, 2)[:2], (logits,))


@pytest.mark.parametrize("group", [1, 3])
def test_grad_gather_rows(group):
    x = _randn(4, 5, dtype=torch.float64).requires_grad_()
    index = (torch.tensor([11, 0, 1, 5, 5, 2, 7])[: 4 * group if group > 1 else 4] % (4 * group)).to(DEV)
    torch.autograd.gradcheck(lambda x: ops.gather_rows(x, index, group), (x,))


def test_grad_scatter_ksum():
    _, gates, _, _, slot_positions, _ = reference.route_topk_ref(_randn(5, 4), 3)
    y = _randn(15, 6, dtype=torch.float64).requires_grad_()
    gates = gates.double().requires_grad_()
    torch.autograd.gradcheck(lambda y, g: ops.scatter_ksum(y, g, slot_positions), (y, gates))


@pytest.mark.parametrize("activation", ["none", "gelu_new"])
def test_grad_expert_gemm(activation):
    offsets = torch.tensor([0, 2, 2, 9, 10], device=DEV)
    x = _randn(10, 6, dtype=torch.float64).requires_grad_()
    w = _randn(4, 6, 5, seed=1, dtype=torch.float64).requires_grad_()
    torch.autograd.gradcheck(lambda x, w: ops.expert_gemm(x, w, offsets, activation), (x, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [[20, 0, 3], [200, 64, 0]])  # GEMV forward / tiled forward
def test_grad_expert_gemm_vs_reference(rows, dtype):
    x, w, offsets = _gemm_inputs(rows, 32, 48, dtype)
    x.requires_grad_()
    w.requires_grad_()
    dy = _randn(sum(rows), 48, seed=2, dtype=dtype)
    got = torch.autograd.grad(ops.expert_gemm(x, w, offsets, "gelu_new"), (x, w), dy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.autograd.grad(reference.expert_gemm_ref(xd, wd, offsets, "gelu_new"), (xd, wd), dy.double())
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert_close(a, b, dtype=dtype, what="expert_gemm grad")


def test_grad_layer_vs_reference():
    logits, h, w1, w2 = (t.requires_grad_() for t in _layer_inputs(50, torch.float32, e=4, c=16, d=24))
    got = torch.autograd.grad(_moe_layer(logits, h, w1, w2, 2).square().sum(), (logits, h, w1, w2))

    def ref_layer():
        _, gates, _, ss, sp, off = reference.route_topk_ref(logits, 2)
        x = reference.expert_gemm_ref(reference.gather_rows_ref(h, ss, 2), w1, off, "gelu_new")
        return reference.scatter_ksum_ref(reference.expert_gemm_ref(x, w2, off), gates, sp)

    want = torch.autograd.grad(ref_layer().square().sum(), (logits, h, w1, w2))
    for a, b in zip(got, want):
        assert_close(a, b, dtype=torch.float32, what="layer grad")


# ------------------------------------------------------------------------------------------------------ bad inputs
BAD = [
    ("route_topk", lambda: (torch.randn(3, 4, 2), 1), ValueError, "rank"),
    ("route_topk", lambda: (torch.randn(3, 4), 5), ValueError, "k must be in"),
    ("route_topk", lambda: (torch.zeros(3, 4, dtype=torch.int32), 1), TypeError, "logits must be float32"),
    ("gather_rows", lambda: (torch.randn(3, 4), torch.tensor([0], dtype=torch.int32), 1), TypeError, "int64"),
    ("gather_rows", lambda: (torch.randn(3, 4), torch.tensor([0]), 0), ValueError, "group"),
    ("gather_rows", lambda: (torch.randn(4, 3).t(), torch.tensor([0]), 1), ValueError, "stride"),
    ("scatter_ksum", lambda: (torch.randn(6, 4), torch.randn(2, 2), torch.arange(6)), ValueError, "N*k"),
    (
        "expert_gemm",
        lambda: (torch.randn(4, 8), torch.randn(2, 7, 3), torch.tensor([0, 2, 4]), "none"),
        ValueError,
        "K ==",
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
]
# value errors need the data on the host: raised only with set_kernel_options(value_checks=True)
BAD_VALUES = [
    ("gather_rows", lambda: (torch.randn(3, 4), torch.tensor([0, 3]), 1), "out of range"),
    ("gather_rows", lambda: (torch.randn(3, 4), torch.tensor([-1]), 1), "out of range"),
    ("scatter_ksum", lambda: (torch.randn(4, 4), torch.randn(2, 2), torch.tensor([0, 1, 2, 9])), "out of range"),
    (
        "expert_gemm",
        lambda: (torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([0, 2, 5]), "none"),
        "expert_offsets",
    ),
    (
        "expert_gemm",
        lambda: (torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([0, 5, 4]), "none"),
        "non-decreasing",
    ),
]


def _to_dev(args):
    return tuple(a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("name,make,exc,needle", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs(name, make, exc, needle):
    with pytest.raises(exc, match=re.escape(needle)) as info:
        getattr(ops, name)(*_to_dev(make()))
    assert f"molm::{name}" in str(info.value)


@pytest.mark.parametrize("name,make,needle", BAD_VALUES, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_VALUES)])
def test_bad_values_raise_with_checks(name, make, needle, kernel_options):
    kernel_options(value_checks=True)
    with pytest.raises(ValueError, match=re.escape(needle)) as info:
        getattr(ops, name)(*_to_dev(make()))
    assert f"molm::{name}" in str(info.value)


def test_bad_values_without_checks_are_memory_safe(kernel_options):
    kernel_options(value_checks=False)
    out = ops.gather_rows(_randn(3, 4), torch.tensor([0, 3, -1], device=DEV))
    assert not out[0].isnan().any() and out[1:].isnan().all()
    out = ops.scatter_ksum(_randn(4, 4), _randn(2, 2), torch.tensor([0, 1, 2, 9], device=DEV))
    assert not out[0].isnan().any() and out[1].isnan().all()
    ops.expert_gemm(_randn(4, 8), _randn(2, 8, 3), torch.tensor([0, 2, 500], device=DEV))  # clamped, no fault
    torch.cuda.synchronize()
