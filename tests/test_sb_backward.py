"""The fused backward of sb_attention (molm::sb_attention_backward) against autograd of the pure-torch reference.

Every gradient (dq, dk, dv, and dbias where asked) is compared with autograd of `sb_attention_ref` run in fp64 on
the same (rounded) inputs; the bound is the shared rule of tolerances.py, with the reference's own error in the
test dtype (fp32 or bf16 autograd of the reference) as the low-precision yardstick.
"""

from __future__ import annotations

import pytest
import torch

from molm import ops, reference

from tolerances import assert_close

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="molm._C not built")

FMIN = torch.finfo(torch.float32).min


def _inputs(B, T, S, G, H, D, dtype, padded, shared_kv, seed=0, logit_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, G, H, D, generator=g)
    k = torch.randn(B, S, H, D, generator=g)
    v = k if shared_kv else torch.randn(B, S, H, D, generator=g)
    bias = torch.full((B, S), logit_shift)
    if padded:
        bias[0, : S // 2] = FMIN  # left padding; query rows of batch 0 inside it are fully padded
        bias[-1, : min(S - 1, 3)] = FMIN
    grad = torch.randn(B, T, G, H, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), bias, grad.to(dtype)


def _grads(fn, q, k, v, bias, grad, scale, shared_kv, bias_grad, dtype):
    """Gradients of fn(q, k, v, bias, scale) . grad with respect to q, kv (or k and v) and bias, inputs in dtype."""
    q = q.detach().to(dtype).requires_grad_()
    k = k.detach().to(dtype).requires_grad_()
    v = k if shared_kv else v.detach().to(dtype).requires_grad_()
    b = bias.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(bias_grad)
    out = fn(q, k, v, b, scale)
    leaves = [q, k] + ([] if shared_kv else [v]) + ([b] if bias_grad else [])
    return torch.autograd.grad(out, leaves, grad.to(dtype))


# (B, T, S, k slots, H, D)
CASES = [
    (1, 1, 1, 1, 1, 8),
    (2, 1, 9, 2, 1, 16),  # decode, cached keys
    (1, 3, 10, 3, 2, 8),  # T < S
    (2, 7, 7, 4, 1, 32),
    (1, 40, 40, 2, 2, 64),
    (2, 70, 150, 1, 1, 128),  # query tiles of 128 rows, T < S
    (1, 130, 130, 2, 1, 24),  # several query tiles with k = 2
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shared_kv", [True, False])
@pytest.mark.parametrize("B,T,S,G,H,D", CASES)
def test_sb_backward_vs_reference(B, T, S, G, H, D, padded, shared_kv, dtype):
    q, k, v, bias, grad = _inputs(B, T, S, G, H, D, dtype, padded, shared_kv)
    scale = D**-0.5
    bias_grad = padded  # also check dbias where a bias is given
    got = _grads(ops.sb_attention, q, k, v, bias, grad, scale, shared_kv, bias_grad, dtype)
    exact = _grads(reference.sb_attention_ref, q, k, v, bias, grad, scale, shared_kv, bias_grad, torch.float64)
    lowp = _grads(reference.sb_attention_ref, q, k, v, bias, grad, scale, shared_kv, bias_grad, dtype)
    names = ["dq", "dkv" if shared_kv else "dk"] + ([] if shared_kv else ["dv"]) + (["dbias"] if bias_grad else [])
    for name, a, e, lp in zip(names, got, exact, lowp):
        assert a.dtype == (torch.float32 if name == "dbias" else dtype)
        assert torch.isfinite(a).all(), name
        assert_close(a, e, lp, dtype if name != "dbias" else torch.float32, f"{name} {dtype}")
    if padded and T > S // 2:  # fully padded query rows of batch 0 receive no gradient
        n_dead = S // 2 - (S - T)
        assert torch.all(got[0][0, :n_dead] == 0)


@pytest.mark.parametrize("shift", [30.0, -30.0])  # all beta ~ 1 (only the diagonal counts) / all beta ~ 0
def test_sb_backward_saturated_logits(shift):
    q, k, v, bias, grad = _inputs(2, 20, 24, 2, 1, 16, torch.float32, False, False, logit_shift=shift)
    got = _grads(ops.sb_attention, q, k, v, bias, grad, 0.25, False, True, torch.float32)
    exact = _grads(reference.sb_attention_ref, q, k, v, bias, grad, 0.25, False, True, torch.float64)
    lowp = _grads(reference.sb_attention_ref, q, k, v, bias, grad, 0.25, False, True, torch.float32)
    for name, a, e, lp in zip(["dq", "dk", "dv", "dbias"], got, exact, lowp):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, lp, torch.float32, f"{name} shift={shift}")


def test_sb_backward_op_direct_and_bitwise():
    """The raw op: shapes, dtypes, dbias only when asked, and two runs bitwise equal."""
    q, k, v, bias, grad = _inputs(2, 50, 300, 2, 1, 32, torch.float32, True, False)
    a = torch.ops.molm.sb_attention_backward(grad, q, k, v, bias, 0.2, True)
    b = torch.ops.molm.sb_attention_backward(grad, q, k, v, bias, 0.2, True)
    assert [t.shape for t in a] == [q.shape, k.shape, v.shape, bias.shape]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    none = torch.ops.molm.sb_attention_backward(grad, q, k, v, None, 0.2, False)
    assert none[3].numel() == 0


def test_sb_backward_fp64_gradcheck_with_bias():
    q, k, v, bias, _ = _inputs(1, 4, 6, 2, 1, 4, torch.float64, True, False)
    bias[0, 3] = 0.7
    leaves = [t.requires_grad_() for t in (q, k, v, bias.double())]
    torch.autograd.gradcheck(lambda q, k, v, b: ops.sb_attention(q, k, v, b, 0.5), leaves)


def test_sb_backward_bad_input():
    q, k, v, bias, grad = _inputs(1, 3, 5, 2, 1, 8, torch.float32, False, False)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.molm.sb_attention_backward(grad[:, :2], q, k, v, bias, 0.2, False)
    with pytest.raises(ValueError, match="bias_grad"):
        torch.ops.molm.sb_attention_backward(grad, q, k, v, None, 0.2, True)


def test_sb_backward_opcheck():
    """Schema, fake kernel and dispatch of the backward op agree (torch.library.opcheck)."""
    q, k, v, bias, grad = _inputs(1, 3, 5, 2, 1, 8, torch.float32, True, False)
    torch.library.opcheck(torch.ops.molm.sb_attention_backward, (grad, q, k, v, bias, 0.3, True))
    torch.library.opcheck(torch.ops.molm.sb_attention_backward, (grad, q, k, v, None, 0.3, False))
