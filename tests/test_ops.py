"""Every molm op against its pure-torch twin in molm.reference, on every device (the `device` fixture of
tests/conftest.py: the CPU, and CUDA when there is one) and, where the CPU kernels have per-instruction-set bodies,
on each instruction set this CPU supports: values, integers exactly, bitwise repeatability, opcheck (schema, fakes,
autograd registration), input validation, gradients, a torch.compile trace and, on CUDA, graph capture (no host sync).

Sizes reach every kernel path of both devices: the CPU's GEMV bodies and their row/column tails, the CUDA decode
GEMV, WMMA and SIMT tiles, the sm_90a grouped GEMM, vectorised and scalar rows. Random data is drawn on the CPU (the
same numbers on every machine) and moved to the device. The CUDA attention kernels have their own file,
tests/test_cuda_attention.py."""

from __future__ import annotations

import re

import pytest
import torch

from molm import ops, reference

from tolerances import FLOORS, assert_close

pytestmark = pytest.mark.extension

DTYPES = [torch.float32, torch.bfloat16]
FMIN = torch.finfo(torch.float32).min
# ops with a CUDA kernel of their own here (sb_attention's are tested in tests/test_cuda_attention.py)
CUDA_OPS = ("route_topk", "gather_rows", "scatter_ksum", "expert_gemm", "expert_gemm_wgrad")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32, scale=1.0, device="cpu"):
    """Random data drawn on the CPU (same numbers on every machine), moved to `device`."""
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype).to(device)


@pytest.fixture(autouse=True)
def _cuda_kernels_built(request):
    """On CUDA, a build without the CUDA kernels fails by name rather than with a dispatcher error per test."""
    if "device" in request.fixturenames and request.getfixturevalue("device") == "cuda":
        for name in CUDA_OPS:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"molm::{name}", "CUDA")
            assert has, f"no CUDA kernel for {name}"


def _check_sort(experts, sorted_slots, slot_positions, expert_offsets, n_experts):
    flat = experts.reshape(-1).cpu()
    sorted_slots, slot_positions, expert_offsets = sorted_slots.cpu(), slot_positions.cpu(), expert_offsets.cpu()
    assert torch.equal(sorted_slots, torch.sort(flat, stable=True).indices)
    assert torch.equal(slot_positions[sorted_slots], torch.arange(flat.numel()))
    counts = torch.bincount(flat, minlength=n_experts)
    assert torch.equal(expert_offsets, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))


# ------------------------------------------------------------------------------------------------------ route_topk
# (N, E, k): k == E, N = 0, N spanning many 64-token chunks
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
def test_route_topk(n_tokens, n_experts, k, dtype, device):
    logits = _randn(n_tokens, n_experts, seed=n_tokens, dtype=dtype, device=device)
    probs, gates, experts, sorted_slots, slot_positions, offsets = ops.route_topk(logits, k)
    r_probs, r_gates, r_experts, *_ = reference.route_topk_ref(logits, k)
    assert probs.device.type == device and experts.dtype == torch.int64 and gates.dtype == dtype
    assert torch.equal(probs, r_probs)  # ATen's softmax on the same device: bitwise
    assert torch.equal(gates, r_gates)  # top-k values do not depend on tie order
    top = torch.sort(r_probs.float(), dim=-1, descending=True).values[:, : k + 1]  # ties among the first k+1
    no_tie = (top[:, :-1] != top[:, 1:]).all(-1)
    assert torch.equal(experts[no_tie], r_experts[no_tie])
    assert torch.equal(probs.gather(1, experts), gates)
    _check_sort(experts, sorted_slots, slot_positions, offsets, n_experts)


def test_route_topk_ties_pick_lower_expert(device):
    logits = torch.zeros(3, 6, device=device)
    logits[1, 4] = logits[1, 2] = 1.0
    _, _, experts, *_ = ops.route_topk(logits, 3)
    assert experts.tolist() == [[0, 1, 2], [2, 4, 0], [0, 1, 2]]


@pytest.mark.parametrize("n_tokens", [40, 4000])
@pytest.mark.parametrize("skew", ["one_expert", "uniform"])
def test_route_topk_all_on_one_and_empty_experts(skew, n_tokens, device):
    logits = torch.randn(n_tokens, 32, generator=_gen(3))
    if skew == "one_expert":
        logits[:, 5] += 100.0
    _, _, experts, sorted_slots, slot_positions, offsets = ops.route_topk(logits.to(device), 1)
    _check_sort(experts, sorted_slots, slot_positions, offsets, 32)
    if skew == "one_expert":
        assert offsets.tolist() == [0] * 6 + [n_tokens] * 27


@pytest.mark.devices("cuda")
def test_route_topk_matches_cpu_kernel(device):
    logits = torch.randn(300, 32, generator=_gen(7))
    cpu = ops.route_topk(logits, 4)
    gpu = ops.route_topk(logits.to(device), 4)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0])  # softmax: CPU and CUDA ATen may differ in the last bit
    assert torch.equal(cpu[2], gpu[2].cpu())  # random fp32 logits: no near-ties, so the same choices
    for a, b in zip(cpu[3:], gpu[3:]):  # and then the same integers from both counting sorts
        assert torch.equal(a, b.cpu())


@pytest.mark.devices("cuda")
def test_route_topk_nan_ranks_first(device):
    logits = torch.randn(4, 5, generator=_gen()).to(device)
    logits[2, 3] = float("nan")
    cpu = ops.route_topk(logits.cpu(), 2)
    gpu = ops.route_topk(logits, 2)
    assert torch.equal(cpu[2], gpu[2].cpu())


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
def test_gather_rows(n_rows, width, group, m, dtype, device):
    x = _randn(n_rows, width, dtype=dtype, device=device)
    index = torch.randint(0, n_rows * group, (m,), generator=_gen(1)).to(device)
    assert torch.equal(ops.gather_rows(x, index, group), reference.gather_rows_ref(x, index, group))


@pytest.mark.parametrize("start", [2, 8])  # start 2: rows misaligned for 16-byte vectors; 8: aligned
def test_gather_rows_strided_source(start, device):
    x = _randn(6, 40, device=device)[:, start : start + 16]  # row stride 40, stride(-1) == 1
    index = torch.tensor([5, 0, 3, 3], device=device)
    assert torch.equal(ops.gather_rows(x, index), reference.gather_rows_ref(x, index))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_gradient_is_bitwise_repeatable(dtype, device):
    """Many rows read the same source row: their gradients are summed in a fixed order (no float atomics)."""
    x = _randn(64, 256, dtype=dtype, device=device).requires_grad_(True)
    index = torch.randint(0, 64 * 2, (8192,), generator=_gen(3)).to(device)
    grad = _randn(8192, 256, seed=4, dtype=dtype, device=device)
    first = torch.autograd.grad(ops.gather_rows(x, index, 2), x, grad)[0]
    for _ in range(3):
        assert torch.equal(torch.autograd.grad(ops.gather_rows(x, index, 2), x, grad)[0], first)
    dense = torch.zeros(64, 8192, dtype=torch.float64, device=device)
    dense[torch.div(index, 2, rounding_mode="floor"), torch.arange(8192, device=device)] = 1.0
    assert_close(first, dense @ grad.double(), dtype=dtype, what="gather_rows grad")


# ------------------------------------------------------------------------------------------------------ scatter_ksum
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n_tokens,n_experts,k,width",
    [(1, 4, 1, 8), (1, 32, 2, 1024), (37, 8, 3, 33), (64, 16, 4, 64), (9, 4, 4, 12), (4096, 32, 2, 1024)],
)
def test_scatter_ksum(n_tokens, n_experts, k, width, dtype, device):
    _, gates, _, _, slot_positions, _ = reference.route_topk_ref(_randn(n_tokens, n_experts, device=device), k)
    y = _randn(n_tokens * k, width, seed=2, dtype=dtype, device=device)
    gates = gates.to(dtype)
    out = ops.scatter_ksum(y, gates, slot_positions)
    ref = reference.scatter_ksum_ref(y, gates, slot_positions)
    assert out.dtype == dtype and out.shape == (n_tokens, width)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


def test_scatter_ksum_no_tokens(device):
    no_slots = torch.empty(0, dtype=torch.int64, device=device)
    out = ops.scatter_ksum(_randn(0, 8, device=device), _randn(0, 2, device=device), no_slots)
    assert out.shape == (0, 8) and out.device.type == device


def test_scatter_ksum_strided_y_and_fp32_gates(device):
    _, gates, _, _, slot_positions, _ = reference.route_topk_ref(_randn(10, 4, device=device), 2)
    y = _randn(20, 50, dtype=torch.bfloat16, device=device)[:, 3:35]  # misaligned rows -> scalar path
    out = ops.scatter_ksum(y, gates, slot_positions)  # fp32 gates with bf16 y
    torch.testing.assert_close(out, reference.scatter_ksum_ref(y, gates, slot_positions), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------ expert_gemm
# (rows per expert, K, Nout). Decode-sized segments (the CPU's per-instruction-set GEMV bodies up to 16 rows, the CUDA
# GEMV up to 32) with empty experts and odd depths and widths for the bodies' row and column tails; then segments
# for the GEMMs (at::mm / oneDNN on the CPU, the same on every instruction set; the WMMA and SIMT tiles on CUDA).
GEMM_CASES = [
    ([1, 0, 2, 0], 64, 128),
    ([3, 17, 0, 5], 48, 40),
    ([16, 1, 4, 2], 256, 72),
    ([0, 0, 0, 0], 16, 24),
    ([2], 1024, 2048),
    ([1, 1], 1024, 2048),
    ([9, 0, 3], 100, 36),  # CUDA GEMV: a segment of > 8 rows, Nout not a multiple of 8 (scalar weight loads)
    ([5] * 32, 24, 8),
    ([1, 0, 1, 0], 1024, 512),
    ([1, 2, 0, 3, 4], 257, 130),
    ([0, 5, 16, 1], 64, 47),
    ([2, 1], 513, 1031),
    ([3], 7, 33),
]
GEMM_LARGE_CASES = [
    ([0, 0, 40, 0], 33, 50),
    ([100, 0, 37, 300], 256, 320),
    ([0, 513, 0, 1], 64, 130),
    ([130, 0, 0, 0, 127], 1024, 2048),
]


def _gemm_inputs(rows, k_in, n_out, dtype, seed=0, device="cpu"):
    offsets = torch.tensor([0] + rows).cumsum(0).to(device)
    x = _randn(sum(rows), k_in, seed=seed, dtype=dtype, device=device)
    weight = _randn(len(rows), k_in, n_out, seed=seed + 1, dtype=dtype, scale=k_in**-0.5, device=device)
    return x, weight, offsets


def _poison_allocator(shape, dtype, device):
    """Leave NaN in the block the next allocation of this size gets, so an unwritten output shows up."""
    out = torch.full(shape, float("nan"), device=device, dtype=dtype)
    del out


def _check_expert_gemm(rows, k_in, n_out, activation, dtype, device):
    x, weight, offsets = _gemm_inputs(rows, k_in, n_out, dtype, device=device)
    _poison_allocator((sum(rows), n_out), dtype, device)
    out = ops.expert_gemm(x, weight, offsets, activation)
    ref = reference.expert_gemm_ref(x.double(), weight.double(), offsets, activation)
    lowp = reference.expert_gemm_ref(x, weight, offsets, activation) if dtype != torch.float32 else None
    assert out.dtype == dtype and not out.isnan().any()
    assert_close(out, ref, lowp, dtype, f"expert_gemm [{device}, {ops.cpu_isa() if device == 'cpu' else ''}]")


@pytest.mark.cpu_isas
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("activation", ["none", "gelu_new"])
@pytest.mark.parametrize("rows,k_in,n_out", GEMM_CASES)
def test_expert_gemm(rows, k_in, n_out, activation, dtype, device):
    _check_expert_gemm(rows, k_in, n_out, activation, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("activation", ["none", "gelu_new"])
@pytest.mark.parametrize("rows,k_in,n_out", GEMM_LARGE_CASES)
def test_expert_gemm_large_segments(rows, k_in, n_out, activation, dtype, device):
    _check_expert_gemm(rows, k_in, n_out, activation, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [30, 300])  # small M with a transposed view still takes the CUDA tiled kernel
def test_expert_gemm_transposed_weight_view(m, dtype, device):
    offsets = torch.tensor([0, 3, 3, m], device=device)
    x = _randn(m, 24, dtype=dtype, device=device)
    w_t = _randn(3, 40, 24, seed=1, dtype=dtype, device=device)  # [E, Nout, K] contiguous; pass [E, K, Nout] view
    out = ops.expert_gemm(x, w_t.transpose(1, 2), offsets)
    ref = reference.expert_gemm_ref(x.double(), w_t.transpose(1, 2).double(), offsets)
    assert_close(out, ref, dtype=dtype, what="expert_gemm mT")


def test_expert_gemm_fp64(device):
    x, weight, offsets = _gemm_inputs([20, 0, 45], 37, 19, torch.float64, device=device)
    out = ops.expert_gemm(x, weight, offsets, "gelu_new")
    assert_close(out, reference.expert_gemm_ref(x, weight, offsets, "gelu_new"), what="expert_gemm fp64")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("rows,k_in,n_out", [([3, 0, 17, 5], 48, 40), ([200, 1, 0, 90], 130, 260), ([0, 0], 8, 8)])
def test_expert_gemm_wgrad(rows, k_in, n_out, dtype, device):
    x, _, offsets = _gemm_inputs(rows, k_in, n_out, dtype, device=device)
    g = _randn(sum(rows), n_out, seed=5, dtype=dtype, device=device)
    got = torch.ops.molm.expert_gemm_wgrad(x, g, offsets, len(rows))
    bounds = offsets.tolist()
    want = torch.stack([x[a:b].double().T @ g[a:b].double() for a, b in zip(bounds[:-1], bounds[1:])])
    assert got.dtype == dtype and got.shape == (len(rows), k_in, n_out)
    assert_close(got, want, dtype=dtype, what="expert_gemm_wgrad")
    assert torch.equal(got, torch.ops.molm.expert_gemm_wgrad(x, g, offsets, len(rows)))  # bitwise repeatable


def test_expert_gemm_wgrad_strided_x(device):
    x = _randn(30, 64, device=device)[:, ::2]  # stride(-1) == 2 is allowed for wgrad
    g = _randn(30, 16, seed=1, device=device)
    offsets = torch.tensor([0, 10, 30], device=device)
    got = torch.ops.molm.expert_gemm_wgrad(x, g, offsets, 2)
    want = torch.stack([x[:10].T @ g[:10], x[10:].T @ g[10:]])
    assert_close(got, want, what="wgrad strided")


# ------------------------------------------------------------------------------------------------------ sm_90a CUTLASS
# The CUTLASS grouped GEMM (csrc/cuda/expert_gemm_sm90.cu) runs on compute capability 9.0 for bf16/fp16 with M above
# the GEMV range (set_kernel_options(sm90_gemm="on"), and by default); "off" forces the WMMA tiles. Elsewhere both
# settings take the WMMA tiles, so the tests still hold. Cases: empty experts, M_e not a multiple of the 128-row
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


@pytest.mark.devices("cuda")
@pytest.mark.parametrize("sm90", ["on", "off"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["none", "gelu_new"])
@pytest.mark.parametrize("rows,k_in,n_out", SM90_CASES)
def test_expert_gemm_sm90_switch(rows, k_in, n_out, activation, dtype, sm90, kernel_options, device):
    kernel_options(sm90_gemm=sm90)
    x, weight, offsets = _gemm_inputs(rows, k_in, n_out, dtype, seed=5, device=device)
    _poison_allocator((sum(rows), n_out), dtype, device)
    out = ops.expert_gemm(x, weight, offsets, activation)
    ref = reference.expert_gemm_ref(x.double(), weight.double(), offsets, activation)
    lowp = reference.expert_gemm_ref(x, weight, offsets, activation)
    assert out.dtype == dtype and not out.isnan().any()
    assert_close(out, ref, lowp, dtype, f"expert_gemm sm90={sm90}")
    assert torch.equal(out, ops.expert_gemm(x, weight, offsets, activation))  # no split-K: bitwise repeatable


@pytest.mark.devices("cuda")
def test_expert_gemm_sm90_on_and_off_agree(device):
    """Both paths accumulate in fp32 and round once: they differ by at most a bf16 rounding of nearly equal sums."""
    x, weight, offsets = _gemm_inputs([300, 0, 700, 24], 1024, 2048, torch.bfloat16, seed=6, device=device)
    with ops.kernel_options_scope(sm90_gemm="on"):
        on = ops.expert_gemm(x, weight, offsets, "gelu_new").float()
    with ops.kernel_options_scope(sm90_gemm="off"):
        off = ops.expert_gemm(x, weight, offsets, "gelu_new").float()
    torch.testing.assert_close(on, off, rtol=2**-7, atol=2e-3)


@pytest.mark.devices("cuda")
def test_expert_gemm_sm90_cuda_graph(kernel_options, device):
    """The device-side problem setup needs no host sync: the sm90 path captures, and replays with new offsets."""
    kernel_options(sm90_gemm="on")
    x, weight, offsets = _gemm_inputs([200, 56, 0, 256], 256, 512, torch.bfloat16, seed=7, device=device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.expert_gemm(x, weight, offsets, "gelu_new")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.expert_gemm(x, weight, offsets, "gelu_new")
    offsets.copy_(torch.tensor([0, 0, 300, 400, 512], device=device))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ops.expert_gemm(x, weight, offsets, "gelu_new"))
    ref = reference.expert_gemm_ref(x.double(), weight.double(), offsets, "gelu_new")
    assert_close(captured, ref, dtype=torch.bfloat16, what="expert_gemm sm90 graph replay")


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


@pytest.mark.devices("cpu")
@pytest.mark.cpu_isas
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("B,T,S,G,H,D", SB_CASES)
def test_sb_attention(B, T, S, G, H, D, padded, dtype, device):
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


@pytest.mark.devices("cpu")
def test_sb_attention_shared_kv_and_strided_cache(device):
    cache = torch.randn(2, 50, 3 * 32, generator=_gen())  # [B, S_max, H*D] preallocated, use the first 40
    kv = cache[:, :40].view(2, 40, 3, 32) if cache[:, :40].is_contiguous() else cache[:, :40].unflatten(-1, (3, 32))
    q = torch.randn(2, 1, 2, 3, 32, generator=_gen(1))
    out = ops.sb_attention(q, kv, kv, None, 32**-0.5)
    assert_close(out, reference.sb_attention_ref(q, kv, kv, None, 32**-0.5), what="sb strided")


@pytest.mark.devices("cpu")
def test_sb_attention_left_padding_invariance(device):
    q, k, v, _ = _sb_inputs(1, 5, 12, 2, 1, 16, torch.float32, False)
    pad = 4
    kp = torch.cat([torch.randn(1, pad, 1, 16), k], 1)
    vp = torch.cat([torch.randn(1, pad, 1, 16), v], 1)
    bias = torch.zeros(1, 12 + pad)
    bias[:, :pad] = FMIN
    torch.testing.assert_close(ops.sb_attention(q, kp, vp, bias, 0.25), ops.sb_attention(q, k, v, None, 0.25))


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("S", [80, 700])  # one key chunk, two (chunks hold 512 keys)
def test_sb_decode_is_bitwise_independent_of_threads_and_left_padding(S, device):
    """A batch-1 decode step splits its query slots over the pool's threads: any thread count, and left padding of
    the cache (which serving adds when it batches requests of other lengths), give exactly the same output."""
    q, k, v, _ = _sb_inputs(1, 1, S, 2, 1, 64, torch.float32, False, seed=S)  # fp32: no rounding hides a change
    pad = 300
    kp = torch.cat([torch.randn(1, pad, 1, 64, generator=_gen(1)), k], 1)
    bias = torch.full((1, S), -4.0)  # small stick-breaking weights: the oldest keys still count in fp32
    padded_bias = torch.cat([torch.full((1, pad), FMIN), bias], 1)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 8):  # 8 > this machine's cores on CI: more workers than (row, chunk) items
            torch.set_num_threads(n)
            outs += [ops.sb_attention(q, k, k, bias, 0.125), ops.sb_attention(q, kp, kp, padded_bias, 0.125)]
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    ref = reference.sb_attention_ref(q.double(), k.double(), k.double(), bias.double(), 0.125)
    assert_close(outs[0], ref, reference.sb_attention_ref(q, k, k, bias, 0.125), torch.float32, "sb decode")


# ------------------------------------------------------------------------------------------------------ linear, int8
@pytest.mark.devices("cpu")
@pytest.mark.cpu_isas
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16, 40])  # the streaming dot products (<= 16 rows), then the GEMM of gemm.h
def test_linear(m, dtype, device):
    g = _gen(m)
    x = torch.randn(m, 200, generator=g).to(dtype)
    w = (torch.randn(131, 200, generator=g) * 200**-0.5).to(dtype)  # 131 rows: a tail of 3 after the 4-row blocks
    out = ops.linear(x, w)
    exact = reference.linear_ref(x.double(), w.double())
    assert_close(out, exact, reference.linear_ref(x.float(), w.float()).to(dtype), dtype, f"linear m={m}")
    assert torch.equal(ops.linear(x, w), out)


@pytest.mark.devices("cpu")
@pytest.mark.cpu_isas
def test_int8_ops(device):
    g = _gen(1)
    x = torch.randn(5, 72, generator=g).to(torch.bfloat16)
    q = torch.randint(-127, 128, (3, 40, 72), generator=g, dtype=torch.int8)  # experts as output rows [E, N, K]
    scale = torch.rand(3, 40, generator=g) * 0.01 + 1e-3
    offsets = torch.tensor([0, 2, 2, 5])
    got = ops.expert_gemm_q8(x, q, scale, offsets, "gelu_new")
    want = reference.expert_gemm_ref(
        x.double(), (q.double() * scale.double()[:, :, None]).transpose(1, 2), offsets, "gelu_new"
    )
    assert_close(got, want, reference.expert_gemm_q8_ref(x, q, scale, offsets, "gelu_new"), torch.bfloat16, "q8 gemm")
    got = ops.linear_q8(x, q[0], scale[0])
    want = reference.linear_ref(x.double(), q[0].double() * scale[0].double()[:, None])
    assert_close(got, want, reference.linear_q8_ref(x, q[0], scale[0]), torch.bfloat16, "q8 linear")


@pytest.mark.devices("cpu")
@pytest.mark.cpu_isas
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [31, 64, 2100, 4133])  # below one 32-wide step, exact steps, past the int32 flush + tail
def test_int8_linear_bodies(k, dtype, device):
    """Every int8 GEMV body against the dequantised fp64 product, at depths below, at and past the vector widths,
    with an all-zero row and a row of mixed magnitudes."""
    g = _gen(k)
    x = torch.randn(5, k, generator=g).to(dtype)
    x[1] = 0  # an all-zero row
    x[2, : k // 2] *= 1e-3  # a row with a wide range of magnitudes
    q = torch.randint(-127, 128, (70, k), generator=g, dtype=torch.int8)  # 70 rows: a tail of 2 after 4-row blocks
    scale = torch.rand(70, generator=g) * 0.01 + 1e-3
    got = ops.linear_q8(x, q, scale)
    want = reference.linear_ref(x.double(), q.double() * scale.double()[:, None])
    assert_close(got, want, reference.linear_q8_ref(x, q, scale), dtype, f"q8 linear k={k}")
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    for i in range(5):  # a row's result does not depend on the other rows
        assert torch.equal(ops.linear_q8(x[i : i + 1], q, scale), got[i : i + 1])


# ---------------------------------------------------------------------------------------------------- bitwise / graphs
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


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("name", ["route_topk", "gather_rows", "scatter_ksum", "expert_gemm", "sb_attention"])
def test_bitwise_repeatable(name, device):
    args = _all_ops_inputs()[name]
    a, b = getattr(ops, name)(*args), getattr(ops, name)(*args)
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x, y)


@pytest.mark.devices("cpu")
def test_bitwise_repeatable_large(device):
    q, k, v, bias = _sb_inputs(1, 1, 2000, 2, 1, 256, torch.float32, True)
    assert torch.equal(ops.sb_attention(q, k, v, bias, 0.1), ops.sb_attention(q, k, v, bias, 0.1))
    q, k, v, bias = _sb_inputs(1, 40, 300, 2, 1, 64, torch.bfloat16, True)
    assert torch.equal(ops.sb_attention(q, k, v, bias, 0.1), ops.sb_attention(q, k, v, bias, 0.1))
    x = torch.randn(20, 512)
    w = torch.randn(3, 512, 256)
    off = torch.tensor([0, 2, 7, 20])
    assert torch.equal(ops.expert_gemm(x, w, off), ops.expert_gemm(x, w, off))


def _moe_layer(logits, h, w1, w2, k):
    _, gates, _, sorted_slots, slot_positions, offsets = ops.route_topk(logits, k)
    x = ops.gather_rows(h, sorted_slots, k)
    x = ops.expert_gemm(x, w1, offsets, "gelu_new")
    y = ops.expert_gemm(x, w2, offsets, "none")
    return ops.scatter_ksum(y, gates, slot_positions)


def _layer_inputs(n_tokens, dtype, device, e=8, c=256, d=512):
    return (
        _randn(n_tokens, e, seed=1, device=device),
        _randn(n_tokens, c, seed=2, dtype=dtype, device=device),
        _randn(e, c, d, seed=3, dtype=dtype, scale=c**-0.5, device=device),
        _randn(e, d, c, seed=4, dtype=dtype, scale=d**-0.5, device=device),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens", [4, 1000])
def test_moe_layer_bitwise_repeatable_and_vs_reference(n_tokens, dtype, device):
    logits, h, w1, w2 = _layer_inputs(n_tokens, dtype, device)
    a, b = _moe_layer(logits, h, w1, w2, 2), _moe_layer(logits, h, w1, w2, 2)
    assert torch.equal(a, b)
    _, gates, _, ss, sp, off = reference.route_topk_ref(logits, 2)
    x = reference.gather_rows_ref(h.double(), ss, 2)
    y = reference.expert_gemm_ref(reference.expert_gemm_ref(x, w1.double(), off, "gelu_new"), w2.double(), off)
    assert_close(a, reference.scatter_ksum_ref(y, gates.double(), sp), dtype=dtype, what="moe layer")


@pytest.mark.devices("cuda")
def test_cuda_graph_capture(device):
    """No op synchronises with the host: the whole layer captures into a graph, and replays equal eager runs."""
    logits, h, w1, w2 = _layer_inputs(64, torch.bfloat16, device)
    eager = _moe_layer(logits, h, w1, w2, 2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _moe_layer(logits, h, w1, w2, 2)  # warm up on the side stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _moe_layer(logits, h, w1, w2, 2)
    logits.copy_(_randn(64, 8, seed=11, device=device))  # new routing, same shapes
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, _moe_layer(logits, h, w1, w2, 2))
    assert not torch.equal(captured, eager)


# ------------------------------------------------------------------------------------------------------ opcheck
@pytest.mark.devices("cpu")
@pytest.mark.parametrize("name", ["route_topk", "gather_rows", "scatter_ksum", "expert_gemm", "sb_attention"])
def test_opcheck(name, device):
    args = list(_all_ops_inputs()[name])
    if name in ("scatter_ksum", "expert_gemm", "sb_attention"):
        args[0] = args[0].requires_grad_()
    if name == "expert_gemm":
        args[1] = args[1].requires_grad_()
    torch.library.opcheck(getattr(torch.ops.molm, name).default, tuple(args))


@pytest.mark.devices("cpu")
def test_opcheck_wgrad(device):
    x, g = torch.randn(7, 5), torch.randn(7, 3)
    torch.library.opcheck(torch.ops.molm.expert_gemm_wgrad.default, (x, g, torch.tensor([0, 2, 2, 7]), 3))


@pytest.mark.devices("cpu")
def test_torch_compile_fullgraph(device):
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
# shapes, dtypes and arguments: checked on the host before any kernel runs, on every device
BAD = [
    ("route_topk", lambda: (torch.randn(3, 4, 2), 1), ValueError, "rank"),
    ("route_topk", lambda: (torch.randn(3, 4), 5), ValueError, "k must be in"),
    ("route_topk", lambda: (torch.randn(3, 4), 0), ValueError, "k must be in"),
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
# index values: the CPU kernels always check them; on CUDA that needs the data on the host, so they are checked
# only with set_kernel_options(value_checks=True)
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


def _to(device, args):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("name,make,exc,needle", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs(name, make, exc, needle, device):
    with pytest.raises(exc, match=re.escape(needle)) as info:
        getattr(ops, name)(*_to(device, make()))
    assert f"molm::{name}" in str(info.value)


@pytest.mark.parametrize("name,make,needle", BAD_VALUES, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_VALUES)])
def test_bad_values(name, make, needle, device, request):
    if device == "cuda":  # checking values needs them on the host: CUDA does it only when asked
        request.getfixturevalue("kernel_options")(value_checks=True)
    with pytest.raises(ValueError, match=re.escape(needle)) as info:
        getattr(ops, name)(*_to(device, make()))
    assert f"molm::{name}" in str(info.value)


@pytest.mark.devices("cuda")
def test_bad_values_without_checks_are_memory_safe(kernel_options, device):
    kernel_options(value_checks=False)
    out = ops.gather_rows(_randn(3, 4, device=device), torch.tensor([0, 3, -1], device=device))
    assert not out[0].isnan().any() and out[1:].isnan().all()
    out = ops.scatter_ksum(
        _randn(4, 4, device=device), _randn(2, 2, device=device), torch.tensor([0, 1, 2, 9], device=device)
    )
    assert not out[0].isnan().any() and out[1].isnan().all()
    ops.expert_gemm(
        _randn(4, 8, device=device), _randn(2, 8, 3, device=device), torch.tensor([0, 2, 500], device=device)
    )  # clamped, no fault
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------ gradients
def test_grad_route_topk(device):
    logits = _randn(5, 6, dtype=torch.float64, device=device).requires_grad_()
    torch.autograd.gradcheck(lambda x: ops.route_topk(x, 2)[:2], (logits,))


@pytest.mark.parametrize("group", [1, 3])
def test_grad_gather_rows(group, device):
    x = _randn(4, 5, dtype=torch.float64, device=device).requires_grad_()
    index = (torch.tensor([11, 0, 1, 5, 5, 2, 7])[: 4 * group if group > 1 else 4] % (4 * group)).to(device)
    torch.autograd.gradcheck(lambda x: ops.gather_rows(x, index, group), (x,))


def test_grad_scatter_ksum(device):
    _, gates, _, _, slot_positions, _ = reference.route_topk_ref(_randn(5, 4, device=device), 3)
    y = _randn(15, 6, dtype=torch.float64, device=device).requires_grad_()
    gates = gates.double().requires_grad_()
    torch.autograd.gradcheck(lambda y, g: ops.scatter_ksum(y, g, slot_positions), (y, gates))


@pytest.mark.parametrize("activation", ["none", "gelu_new"])
def test_grad_expert_gemm(activation, device):
    offsets = torch.tensor([0, 2, 2, 9, 10], device=device)
    x = _randn(10, 6, dtype=torch.float64, device=device).requires_grad_()
    w = _randn(4, 6, 5, seed=1, dtype=torch.float64, device=device).requires_grad_()
    torch.autograd.gradcheck(lambda x, w: ops.expert_gemm(x, w, offsets, activation), (x, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [[20, 0, 3], [200, 64, 0]])  # decode-sized / tiled forward
def test_grad_expert_gemm_vs_reference(rows, dtype, device):
    x, w, offsets = _gemm_inputs(rows, 32, 48, dtype, device=device)
    x.requires_grad_()
    w.requires_grad_()
    dy = _randn(sum(rows), 48, seed=2, dtype=dtype, device=device)
    got = torch.autograd.grad(ops.expert_gemm(x, w, offsets, "gelu_new"), (x, w), dy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.autograd.grad(reference.expert_gemm_ref(xd, wd, offsets, "gelu_new"), (xd, wd), dy.double())
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert_close(a, b, dtype=dtype, what="expert_gemm grad")


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("B,T,S,G,H,D", [(2, 3, 5, 2, 1, 4), (1, 1, 6, 2, 2, 3)])
def test_grad_sb_attention(B, T, S, G, H, D, device):
    q, k, v, bias = _sb_inputs(B, T, S, G, H, D, torch.float64, True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.autograd.gradcheck(lambda q, k, v: ops.sb_attention(q, k, v, bias.double(), 0.5), (q, k, v))


def test_grad_layer_vs_reference(device):
    """The MoE layer in fp32: gradients of every input vs the reference ops."""
    logits, h, w1, w2 = (t.requires_grad_() for t in _layer_inputs(50, torch.float32, device, e=4, c=16, d=24))
    got = torch.autograd.grad(_moe_layer(logits, h, w1, w2, 2).square().sum(), (logits, h, w1, w2))

    def ref_layer():
        _, gates, _, ss, sp, off = reference.route_topk_ref(logits, 2)
        x = reference.expert_gemm_ref(reference.gather_rows_ref(h, ss, 2), w1, off, "gelu_new")
        return reference.scatter_ksum_ref(reference.expert_gemm_ref(x, w2, off), gates, sp)

    want = torch.autograd.grad(ref_layer().square().sum(), (logits, h, w1, w2))
    for a, b in zip(got, want):
        assert_close(a, b, dtype=torch.float32, what="layer grad")


@pytest.mark.devices("cpu")
def test_grad_moe_and_attention_chain_vs_reference(device):
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
    assert all(d in FLOORS for d in DTYPES + [torch.float16, torch.float64])
