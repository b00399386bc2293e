"""The fused MoE ops (moe_map, moe_reduce, moe_mlp) against their reference twins: every CPU instruction set this
machine runs, float and int8 weights, decode-sized routings (the fused GEMV path) and prefill-sized ones (the
composed path), gradients, torch.library.opcheck, thread-count and batch independence, and bad input."""

from __future__ import annotations

import pytest
import torch

from molm import ops, reference
from molm.quantization import quantize_tensor

from tolerances import assert_close

pytestmark = [
    pytest.mark.skipif(not ops.extension_available(), reason=f"molm._C not built: {ops.extension_error()}"),
    pytest.mark.usefixtures("restore_isa_and_threads"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (tokens N, slots k, experts E, width C, hidden F): decode, odd sizes, k = E, several rows per expert, all rows
# large enough for the composed path (N*k/E > 16 rows per expert)
SHAPES = [(1, 2, 8, 64, 96), (3, 2, 4, 33, 300), (5, 4, 4, 17, 24), (8, 2, 16, 40, 520), (80, 2, 4, 24, 40)]


def routing(n, k, e, seed=0, one_expert=False):
    logits = torch.randn(n, e, generator=torch.Generator().manual_seed(seed))
    if one_expert:
        logits[:, : e - k] -= 100.0  # every token picks the same k experts
    _, gates, _, sorted_slots, slot_positions, offsets = ops.route_topk(logits, k)
    return gates, sorted_slots, slot_positions, offsets


def weights(e, c, f, dtype, seed=1, int8=False):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(e, c, f, generator=g) / c**0.5
    w2 = torch.randn(e, f, c, generator=g) / f**0.5
    if not int8:
        return (w1.to(dtype), None), (w2.to(dtype), None)
    # int8 experts are stored as output rows [E, out, in] with scales [E, out]
    return quantize_tensor(w1.transpose(1, 2), 2), quantize_tensor(w2.transpose(1, 2), 2)


def exact(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def up(t, dtype):
    return None if t is None else (t if t.dtype == torch.int8 else t.to(exact(dtype)))


# every dtype on the best instruction set, fp32 and bf16 on the others
ISAS = ops.cpu_isas() if ops.extension_available() else []
ISA_DTYPES = [(isa, d) for isa in ISAS for d in DTYPES if isa == ISAS[-1] or d in DTYPES[:2]]


@pytest.mark.parametrize("isa, dtype", ISA_DTYPES, ids=str)
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fused_ops_match_the_reference(isa, int8, dtype, shape):
    ops.set_cpu_isa(isa)
    n, k, e, c, f = shape
    gates, ss, sp, off = routing(n, k, e)
    gates = gates.to(dtype)
    (w1, s1), (w2, s2) = weights(e, c, f, dtype, int8=int8)
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(2)).to(dtype)
    xm = torch.randn(n * k, f, generator=torch.Generator().manual_seed(3)).to(dtype)
    cases = {
        "moe_map": (
            ops.moe_map(x, w1, s1, ss, sp, off, k, "gelu_new"),
            lambda cast: reference.moe_map_ref(cast(x), cast(w1), s1, ss, sp, off, k, "gelu_new"),
        ),
        "moe_reduce": (
            ops.moe_reduce(xm, w2, s2, gates, ss, sp, off),
            lambda cast: reference.moe_reduce_ref(cast(xm), cast(w2), s2, cast(gates), ss, sp, off),
        ),
        "moe_mlp": (
            ops.moe_mlp(x, w1, s1, w2, s2, gates, ss, sp, off, "gelu_new"),
            lambda cast: reference.moe_mlp_ref(cast(x), cast(w1), s1, cast(w2), s2, cast(gates), ss, sp, off),
        ),
    }
    for name, (out, ref) in cases.items():
        assert out.dtype == dtype
        # int8 products and the reference k-sum (scatter_ksum_ref) are fp32 for every dtype
        floor = torch.float32 if dtype == torch.float64 and (int8 or name != "moe_map") else dtype
        assert_close(out, ref(lambda t: up(t, dtype)), ref(lambda t: t), dtype=floor, what=f"{name} {isa}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(6, 2, 4, 24, 40)], ids=str)
def test_fused_float_ops_equal_the_grouped_gemm_composition_bitwise(dtype, shape):
    """With float weights the fused GEMVs sum in expert_gemm's order: the model's numbers do not change."""
    n, k, e, c, f = shape
    gates, ss, sp, off = routing(n, k, e)
    gates = gates.to(dtype)
    (w1, _), (w2, _) = weights(e, c, f, dtype)
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(2)).to(dtype)
    h = ops.expert_gemm(ops.gather_rows(x, ss, k), w1, off, "gelu_new")  # expert order
    mlp = ops.scatter_ksum(ops.expert_gemm(h, w2, off, "none"), gates, sp)
    assert torch.equal(ops.moe_mlp(x, w1, None, w2, None, gates, ss, sp, off, "gelu_new"), mlp)
    assert torch.equal(ops.moe_map(x, w1, None, ss, sp, off, k, "gelu_new"), ops.gather_rows(h, sp, 1))
    hm = ops.gather_rows(h, sp, 1)  # slot order
    reduced = ops.scatter_ksum(ops.expert_gemm(ops.gather_rows(hm, ss, 1), w2, off, "none"), gates, sp)
    assert torch.equal(ops.moe_reduce(hm, w2, None, gates, ss, sp, off), reduced)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(6, 2, 4, 24, 40)], ids=str)
def test_fused_int8_ops_equal_the_expert_gemm_q8_composition_bitwise(dtype, shape):
    """int8 weights: moe_mlp (moe_map then moe_reduce on the CPU) gives bitwise what gather_rows -> expert_gemm_q8
    -> expert_gemm_q8 -> scatter_ksum give."""
    n, k, e, c, f = shape
    gates, ss, sp, off = routing(n, k, e)
    gates = gates.to(dtype)
    (q1, s1), (q2, s2) = weights(e, c, f, dtype, int8=True)
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(2)).to(dtype)
    h = ops.expert_gemm_q8(ops.gather_rows(x, ss, k), q1, s1, off, "gelu_new")  # expert order
    mlp = ops.scatter_ksum(ops.expert_gemm_q8(h, q2, s2, off, "none"), gates, sp)
    assert torch.equal(ops.moe_mlp(x, q1, s1, q2, s2, gates, ss, sp, off, "gelu_new"), mlp)


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_fused_ops_do_not_depend_on_threads_or_on_the_other_tokens(int8):
    e, c, f, k = 8, 64, 520, 2
    (w1, s1), (w2, s2) = weights(e, c, f, torch.bfloat16, int8=int8)
    x = torch.randn(4, c, generator=torch.Generator().manual_seed(5)).bfloat16()
    gates, ss, sp, off = routing(4, k, e, seed=7)
    gates = gates.bfloat16()
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(ops.moe_mlp(x, w1, s1, w2, s2, gates, ss, sp, off, "gelu_new"))
    assert all(torch.equal(results[0], r) for r in results[1:])
    # each token alone gives its row of the batch (the GEMVs sum every row in the same order)
    for t in range(4):
        logits = torch.randn(4, e, generator=torch.Generator().manual_seed(7))[t : t + 1]
        _, g1, _, ss1, sp1, off1 = ops.route_topk(logits, k)
        alone = ops.moe_mlp(x[t : t + 1], w1, s1, w2, s2, g1.bfloat16(), ss1, sp1, off1, "gelu_new")
        assert torch.equal(alone[0], results[0][t])


def test_all_tokens_to_one_expert_and_empty_inputs():
    (w1, _), (w2, _) = weights(4, 16, 24, torch.float32)
    gates, ss, sp, off = routing(6, 2, 4, one_expert=True)
    assert (off.diff() > 0).sum() == 2
    x = torch.randn(6, 16)
    assert_close(
        ops.moe_mlp(x, w1, None, w2, None, gates, ss, sp, off, "gelu_new"),
        reference.moe_mlp_ref(x, w1, None, w2, None, gates, ss, sp, off),
    )
    gates, ss, sp, off = routing(0, 2, 4)
    assert ops.moe_mlp(x[:0], w1, None, w2, None, gates, ss, sp, off, "gelu_new").shape == (0, 16)
    assert ops.moe_map(x[:0], w1, None, ss, sp, off, 2, "none").shape == (0, 24)


@pytest.mark.parametrize("n", [2, 40], ids=["fused", "composed"])
def test_fused_op_gradients_match_the_reference(n):
    k, e, c, f = 2, 4, 12, 20
    gates, ss, sp, off = routing(n, k, e)
    (w1, _), (w2, _) = weights(e, c, f, torch.float64)
    x = torch.randn(n, c, dtype=torch.float64)
    xm = torch.randn(n * k, f, dtype=torch.float64)
    gates = gates.double()
    cases = [
        (ops.moe_map, reference.moe_map_ref, lambda a: (a[0], a[1], None, ss, sp, off, k, "gelu_new"), [x, w1]),
        (ops.moe_reduce, reference.moe_reduce_ref, lambda a: (a[0], a[1], None, a[2], ss, sp, off), [xm, w2, gates]),
        (
            ops.moe_mlp,
            reference.moe_mlp_ref,
            lambda a: (a[0], a[1], None, a[2], None, a[3], ss, sp, off, "gelu_new"),
            [x, w1, w2, gates],
        ),
    ]
    for op, ref, args, inputs in cases:
        ours = [t.clone().requires_grad_() for t in inputs]
        theirs = [t.clone().requires_grad_() for t in inputs]
        out = op(*args(ours))
        grad = torch.randn_like(out)
        out.backward(grad)
        ref(*args(theirs)).backward(grad)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9)


def test_int8_weights_pass_gradients_to_activations_only():
    k, e, c, f = 2, 4, 12, 20
    gates, ss, sp, off = routing(3, k, e)
    (q1, s1), (q2, s2) = weights(e, c, f, torch.float32, int8=True)
    x = torch.randn(3, c, requires_grad=True)
    g = gates.clone().requires_grad_()
    ops.moe_mlp(x, q1, s1, q2, s2, g, ss, sp, off, "gelu_new").sum().backward()
    w1 = (q1.float() * s1[:, :, None]).transpose(1, 2)
    w2 = (q2.float() * s2[:, :, None]).transpose(1, 2)
    x2, g2 = x.detach().clone().requires_grad_(), gates.clone().requires_grad_()
    reference.moe_mlp_ref(x2, w1, None, w2, None, g2, ss, sp, off).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g.grad, g2.grad, rtol=1e-4, atol=1e-5)
    s1p = s1.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="int8 weights cannot be trained"):
        ops.moe_map(x, q1, s1p, ss, sp, off, k, "none").sum().backward()


def test_opcheck():
    """Schema, fake kernels (torch.compile / export), autograd registration and dispatch agree."""
    k, e, c, f = 2, 4, 8, 12
    gates, ss, sp, off = routing(3, k, e)
    (w1, _), (w2, _) = weights(e, c, f, torch.float32)
    (q1, s1), _ = weights(e, c, f, torch.float32, int8=True)
    x = torch.randn(3, c, requires_grad=True)
    xm = torch.randn(3 * k, f, requires_grad=True)
    w1.requires_grad_()
    torch.library.opcheck(torch.ops.molm.moe_map, (x, w1, None, ss, sp, off, k, "gelu_new"))
    torch.library.opcheck(torch.ops.molm.moe_map, (x, q1, s1, ss, sp, off, k, "none"))
    torch.library.opcheck(torch.ops.molm.moe_reduce, (xm, w2, None, gates, ss, sp, off))
    torch.library.opcheck(torch.ops.molm.moe_mlp, (x, w1, None, w2, None, gates, ss, sp, off, "gelu_new"))


def test_bad_input_names_the_problem():
    k, e, c, f = 2, 4, 8, 12
    gates, ss, sp, off = routing(3, k, e)
    (w1, _), (w2, _) = weights(e, c, f, torch.float32)
    (q1, s1), _ = weights(e, c, f, torch.float32, int8=True)
    x = torch.randn(3, c)
    with pytest.raises(ValueError, match=r"moe_mlp: w1 \[E, K, Nout\] must have K == 9"):
        ops.moe_mlp(torch.randn(3, 9), w1, None, w2, None, gates, ss, sp, off, "gelu_new")
    with pytest.raises(ValueError, match="moe_mlp: w2 must map the 12 hidden features"):
        ops.moe_mlp(x, w1, None, w1.transpose(1, 2)[:, :, :5], None, gates, ss, sp, off, "gelu_new")
    with pytest.raises(ValueError, match="sorted_slots must be a permutation"):
        ops.moe_map(x, w1, None, torch.zeros_like(ss), sp, off, k, "none")
    with pytest.raises(ValueError, match=r"the scale of weight must be \[E, Nout\]"):
        ops.moe_map(x, q1, s1[:, :3], ss, sp, off, k, "none")
    with pytest.raises(TypeError, match="qweight must be int8"):
        ops.moe_map(x, w1, s1, ss, sp, off, k, "none")
    with pytest.raises(ValueError, match="activation must be"):
        ops.moe_map(x, w1, None, ss, sp, off, k, "relu")
    with pytest.raises(ValueError, match=r"slot_positions must be \[M = 6\]"):
        ops.moe_reduce(torch.randn(6, f), w2, None, gates, ss, sp[:4], off)
    with pytest.raises(ValueError, match="expert_offsets must start at 0"):
        ops.moe_map(x, w1, None, ss, sp, off + 1, k, "none")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_fused_ops_match_the_cpu_ops(int8, dtype):
    for n, k, e, c, f in SHAPES:
        gates, ss, sp, off = routing(n, k, e)
        (w1, s1), (w2, s2) = weights(e, c, f, dtype, int8=int8)
        x = torch.randn(n, c, generator=torch.Generator().manual_seed(2)).to(dtype)
        args = (x, w1, s1, w2, s2, gates.to(dtype), ss, sp, off, "gelu_new")
        want = ops.moe_mlp(*args)
        got = ops.moe_mlp(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
        assert_close(got.cpu(), want.float(), dtype=dtype, what=f"moe_mlp cuda {(n, k, e, c, f)}")
