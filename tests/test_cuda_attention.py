"""CUDA sb_attention (forward: split-KV decode, the fused tensor-core prefill and the cuBLAS-tiled prefill; backward)
against the pure-torch reference.

The reference runs on the same device in fp64 on the same (rounded) inputs; the bound is tolerances.py's rule with
the reference in the test dtype as the low-precision yardstick. Outputs are checked to be finite and fully written
(the allocator is poisoned with NaN first), runs to be bitwise repeatable, and decode to replay in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from molm import ops, reference

from sb_cases import sb_inputs
from tolerances import assert_close

HAS_CUDA_OP = (
    torch.cuda.is_available()
    and ops.extension_available()
    and torch._C._dispatch_has_kernel_for_dispatch_key("molm::sb_attention", "CUDA")
)
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA_OP, reason="needs CUDA and molm built with CUDA")]

DEV = "cuda"
torch.backends.cuda.matmul.allow_tf32 = False  # fp32 cases are held to fp32 bounds (the prefill GEMMs are cuBLAS)


def _poison_allocator(nbytes: int = 256 << 20) -> None:
    """Fill cached allocator blocks with NaN so that an unwritten output element shows up as NaN."""
    torch.empty(nbytes // 4, device=DEV).fill_(float("nan"))


def _inputs(B, T, S, G, H, D, dtype, padded=False, shared_kv=True, shift=0.0, seed=0):
    return sb_inputs(B, T, S, G, H, D, dtype, padded, shared_kv, shift, seed, device=DEV)


def _check_forward(q, k, v, bias, scale, what):
    dtype = q.dtype
    _poison_allocator()
    out = ops.sb_attention(q, k, v, bias, scale)
    torch.cuda.synchronize()
    assert out.dtype == dtype and out.shape == q.shape and out.device.type == "cuda"
    assert torch.isfinite(out).all(), f"{what}: non-finite or unwritten output"
    exact = reference.sb_attention_ref(q.double(), k.double(), v.double(), bias, scale)
    lowp = reference.sb_attention_ref(q, k, v, bias, scale)
    assert_close(out, exact, lowp, dtype, what)
    return out


# (B, T, S, k slots, H, D): T <= 4 takes the split-KV decode kernel, larger T the tiled path
DECODE = [
    (1, 1, 1, 1, 1, 64),
    (2, 1, 7, 2, 1, 64),
    (3, 1, 1025, 2, 1, 1024),
    (2, 1, 4096, 4, 1, 128),
    (64, 1, 300, 2, 1, 1024),
    (2, 3, 100, 3, 2, 64),
    (1, 4, 4, 2, 1, 128),
    (1, 1, 4096, 5, 2, 64),
    (2, 1, 100, 2, 1, 12),
    (1, 2, 700, 3, 1, 20),
]  # D not a multiple of 8: the scalar-load path in bf16
PREFILL = [
    (1, 5, 5, 1, 1, 64),
    (2, 33, 33, 2, 1, 128),
    (1, 100, 300, 4, 2, 64),
    (2, 257, 257, 2, 1, 1024),
    (1, 1024, 1024, 2, 1, 128),
    (1, 4096, 4096, 1, 1, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("B,T,S,G,H,D", DECODE + PREFILL)
def test_cuda_forward(B, T, S, G, H, D, padded, dtype):
    q, k, v, bias = _inputs(B, T, S, G, H, D, dtype, padded, shared_kv=(B + T) % 2 == 0)
    out = _check_forward(q, k, v, bias, D**-0.5, f"forward {dtype} B={B} T={T} S={S} k={G} H={H} D={D}")
    if padded and T > S // 2:  # fully padded query rows of batch 0 get exactly nothing
        assert torch.all(out[0, : S // 2 - (S - T)] == 0)


@pytest.mark.parametrize("shift", [30.0, -30.0, 8.0])  # all beta ~ 1, all beta ~ 0, mostly ~ 1
@pytest.mark.parametrize("T,S", [(1, 2048), (3, 50), (200, 200)])
def test_cuda_forward_adversarial_logits(T, S, shift):
    q, k, v, bias = _inputs(2, T, S, 2, 1, 64, torch.float32, shift=shift)
    _check_forward(q, k, v, bias, 0.125, f"adversarial shift={shift} T={T} S={S}")


def test_cuda_forward_fp16_fp64_and_strided_cache():
    for dtype in (torch.float16, torch.float64):
        q, k, v, bias = _inputs(2, 6, 40, 2, 1, 64, dtype, padded=True, shared_kv=False)
        _check_forward(q, k, v, bias, 0.125, f"forward {dtype}")
    cache = torch.randn(2, 80, 2 * 64, device=DEV)  # preallocated [B, S_max, H*D] cache, first 50 positions used
    kv = cache[:, :50].unflatten(-1, (2, 64))
    for t in (1, 7):
        q = torch.randn(2, t, 2, 2, 64, device=DEV)
        _check_forward(q, kv, kv, None, 0.125, f"strided cache T={t}")


@pytest.mark.parametrize("B,T,S,G,H,D", [(2, 1, 3000, 2, 1, 1024), (1, 300, 300, 2, 1, 64)])
def test_cuda_matches_cpu_and_is_bitwise_repeatable(B, T, S, G, H, D):
    q, k, v, bias = _inputs(B, T, S, G, H, D, torch.float32, padded=True)
    a = ops.sb_attention(q, k, v, bias, 0.05)
    assert torch.equal(a, ops.sb_attention(q, k, v, bias, 0.05))
    cpu = ops.sb_attention(q.cpu(), k.cpu(), v.cpu(), bias.cpu(), 0.05)
    torch.testing.assert_close(a.cpu(), cpu, rtol=1e-4, atol=1e-5)


# Prefill in 16 bits with D a multiple of 128 takes the fused tensor-core kernels (csrc/cuda/sb_prefill.cuh);
# set_kernel_options(sb_fused=False) sends it to the cuBLAS-tiled path, sb_early_exit=False walks every key.
@pytest.mark.parametrize("fused,early_exit", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,T,S,G,H,D,shift",
    [
        (2, 100, 300, 2, 1, 1024, 0.0),
        (1, 513, 513, 3, 2, 128, 0.0),
        (3, 64, 64, 1, 1, 256, 0.0),
        (1, 700, 700, 2, 1, 128, 8.0),
        (1, 300, 300, 2, 1, 128, -30.0),
    ],
)
def test_cuda_prefill_fused_and_tiled(kernel_options, B, T, S, G, H, D, shift, dtype, fused, early_exit):
    kernel_options(sb_fused=fused, sb_early_exit=early_exit)
    q, k, v, bias = _inputs(B, T, S, G, H, D, dtype, padded=shift == 0.0, shared_kv=B % 2 == 1, shift=shift)
    what = f"prefill fused={fused} exit={early_exit} {dtype} B={B} T={T} S={S} k={G} H={H} D={D} shift={shift}"
    out = _check_forward(q, k, v, bias, D**-0.5, what)
    assert torch.equal(out, ops.sb_attention(q, k, v, bias, D**-0.5)), f"{what}: not bitwise repeatable"


@pytest.mark.parametrize("fused", [True, False])
def test_cuda_backward_fused_and_tiled(kernel_options, fused):
    kernel_options(sb_fused_backward=fused)
    for B, T, S, G, H, D, shared_kv in [(2, 150, 200, 2, 1, 1024, False), (1, 300, 300, 3, 2, 128, True)]:
        q, k, v, bias = _inputs(B, T, S, G, H, D, torch.bfloat16, True, shared_kv)
        grad = torch.randn(q.shape, device=DEV).to(torch.bfloat16)
        got = _grads(ops.sb_attention, q, k, v, bias, grad, 0.05, shared_kv, torch.bfloat16)
        exact = _grads(reference.sb_attention_ref, q, k, v, bias, grad, 0.05, shared_kv, torch.float64)
        lowp = _grads(reference.sb_attention_ref, q, k, v, bias, grad, 0.05, shared_kv, torch.bfloat16)
        for n, (a, e, lp) in enumerate(zip(got, exact, lowp)):
            assert torch.isfinite(a).all(), f"grad {n} non-finite or unwritten"
            assert_close(a, e, lp, torch.bfloat16, f"fused={fused} grad {n} B={B} T={T} S={S} k={G} H={H} D={D}")


def test_cuda_prefill_graph_capture():
    """The fused prefill has no host synchronisation: it replays in a CUDA graph."""
    q, k, v, bias = _inputs(2, 96, 160, 2, 1, 1024, torch.bfloat16, padded=True)
    eager = ops.sb_attention(q, k, v, bias, 1 / 32)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.sb_attention(q, k, v, bias, 1 / 32)
    q.copy_(torch.randn(q.shape, device=DEV).to(q.dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.sb_attention(q, k, v, bias, 1 / 32)) and not torch.equal(out, eager)


def test_cuda_decode_graph_capture():
    """Decode into a static cache replays in a CUDA graph and tracks the inputs copied into it."""
    cache = torch.zeros(4, 1024, 1, 128, device=DEV)
    q = torch.zeros(4, 1, 2, 1, 128, device=DEV)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        ops.sb_attention(q, cache, cache, None, 0.1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.sb_attention(q, cache, cache, None, 0.1)
    for seed in (1, 2):
        g = torch.Generator(device=DEV).manual_seed(seed)
        cache.copy_(torch.randn(cache.shape, generator=g, device=DEV))
        q.copy_(torch.randn(q.shape, generator=g, device=DEV))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(
            out,
            reference.sb_attention_ref(q.double(), cache.double(), cache.double(), None, 0.1),
            dtype=torch.float32,
            what=f"graph replay {seed}",
        )


def _grads(fn, q, k, v, bias, grad, scale, shared_kv, dtype):
    q = q.detach().to(dtype).requires_grad_()
    k = k.detach().to(dtype).requires_grad_()
    v = k if shared_kv else v.detach().to(dtype).requires_grad_()
    b = None if bias is None else bias.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    b = b.requires_grad_() if b is not None else None
    leaves = [q, k] + ([] if shared_kv else [v]) + ([b] if b is not None else [])
    return torch.autograd.grad(fn(q, k, v, b, scale), leaves, grad.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B,T,S,G,H,D,padded,shared_kv",
    [
        (1, 1, 1, 1, 1, 64, False, True),
        (2, 1, 500, 2, 1, 1024, True, True),
        (2, 7, 40, 3, 2, 64, True, False),
        (1, 200, 200, 4, 1, 128, False, True),
        (2, 128, 300, 2, 1, 1024, True, False),
        (1, 2048, 2048, 2, 1, 64, True, True),
    ],
)
def test_cuda_backward(B, T, S, G, H, D, padded, shared_kv, dtype):
    q, k, v, bias = _inputs(B, T, S, G, H, D, dtype, padded, shared_kv)
    grad = torch.randn(q.shape, device=DEV).to(dtype)
    scale = D**-0.5
    _poison_allocator()
    got = _grads(ops.sb_attention, q, k, v, bias, grad, scale, shared_kv, dtype)
    exact = _grads(reference.sb_attention_ref, q, k, v, bias, grad, scale, shared_kv, torch.float64)
    lowp = _grads(reference.sb_attention_ref, q, k, v, bias, grad, scale, shared_kv, dtype)
    for n, (a, e, lp) in enumerate(zip(got, exact, lowp)):
        assert torch.isfinite(a).all(), f"grad {n} non-finite or unwritten"
        assert_close(a, e, lp, dtype, f"grad {n} {dtype} B={B} T={T} S={S} k={G} D={D}")
    again = _grads(ops.sb_attention, q, k, v, bias, grad, scale, shared_kv, dtype)
    assert all(torch.equal(x, y) for x, y in zip(got, again)), "backward not bitwise repeatable"


def test_cuda_backward_matches_cpu_op():
    q, k, v, bias = _inputs(2, 60, 90, 2, 1, 64, torch.float32, padded=True, shared_kv=False)
    grad = torch.randn(q.shape, device=DEV)
    a = torch.ops.molm.sb_attention_backward(grad, q, k, v, bias, 0.1, True)
    c = torch.ops.molm.sb_attention_backward(grad.cpu(), q.cpu(), k.cpu(), v.cpu(), bias.cpu(), 0.1, True)
    for x, y in zip(a, c):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-4, atol=1e-5)
