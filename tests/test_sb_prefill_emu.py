"""The fused CUDA prefill kernels of sb_attention (csrc/cuda/sb_prefill.cuh), run on the CPU emulator.

The kernel source and its pass loop compile with -DMOLM_CUDA_EMU against tests/cuda_emu/cuda_emu.h; each CTA runs as
CPU threads. Outputs are held to the same bound as the CUDA tests (tests/tolerances.py: fp64 reference on the same
rounded inputs, the reference in the test dtype as the low-precision yardstick). The output buffer and the kernels'
weights buffer start as NaN, so an element that is never written, or read before it is written, fails the test.
What the emulator cannot show: real data races, bank conflicts, speed; those need a GPU (tests/test_cuda_attention.py).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from molm import reference

from emu_build import load_emu_library
from sb_cases import sb_inputs
from tolerances import assert_close

H200_SMEM, A100_SMEM = 232448, 166912  # opt-in shared memory per block: kernel 1 uses BD = 64 / BD = 32 chunks


@pytest.fixture(scope="module")
def lib():
    lib = load_emu_library("sb_prefill", ["tests/emu/sb_prefill_emu.cpp"])
    lib.sb_prefill_forward_emu.restype = ctypes.c_int
    lib.sb_prefill_backward_emu.restype = ctypes.c_int
    lib.sb_emu_last_error.restype = ctypes.c_char_p
    return lib


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * (t.dim() - 1))(*t.stride()[:-1])


def fused_forward(
    lib, q, k, v, bias, scale, max_smem=H200_SMEM, max_weights_bytes=256 << 20, exit_below=-30.0, first_key=None
):
    """molm's fused prefill on the emulator: q [B, T, G, H, D], k/v [B, S, H, D] (16-bit, last dim contiguous).
    Returns (out, positions per pass); first_key (int32 tensor) receives the last pass's oldest walked key per
    row tile."""
    B, T, G, H, D = q.shape
    S = k.shape[1]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    bias32 = None if bias is None else bias.float().contiguous()
    shape = (ctypes.c_int * 6)(B, T, G, H, D, S)
    rc = lib.sb_prefill_forward_emu(
        int(q.dtype == torch.bfloat16),
        ctypes.c_void_p(q.data_ptr()),
        _strides(q),
        ctypes.c_void_p(k.data_ptr()),
        _strides(k),
        ctypes.c_void_p(v.data_ptr()),
        _strides(v),
        None if bias32 is None else ctypes.c_void_p(bias32.data_ptr()),
        ctypes.c_float(scale),
        ctypes.c_float(exit_below),
        shape,
        ctypes.c_int64(max_smem),
        ctypes.c_int64(max_weights_bytes),
        ctypes.c_void_p(out.data_ptr()),
        None if first_key is None else ctypes.c_void_p(first_key.data_ptr()),
    )
    if rc < 0:
        raise RuntimeError(lib.sb_emu_last_error().decode())
    return out, rc


def fused_backward(lib, grad, q, k, v, bias, scale, bias_grad, max_smem=H200_SMEM, max_pass_bytes=256 << 20):
    """molm's fused backward on the emulator -> (dq, dk, dv, dbias or None, positions per pass); dk / dv are rounded
    from their fp32 accumulators the way the CUDA entry point does (a copy into the input dtype)."""
    B, T, G, H, D = q.shape
    S = k.shape[1]
    dq = torch.full(q.shape, float("nan"), dtype=q.dtype)
    dk_acc, dv_acc = torch.zeros(B * H, S, D), torch.zeros(B * H, S, D)
    dbias = torch.zeros(B, S) if bias_grad else None
    bias32 = None if bias is None else bias.float().contiguous()
    ptr = lambda t: None if t is None else ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = lib.sb_prefill_backward_emu(
        int(q.dtype == torch.bfloat16),
        ptr(q),
        _strides(q),
        ptr(k),
        _strides(k),
        ptr(v),
        _strides(v),
        ptr(bias32),
        ctypes.c_float(scale),
        (ctypes.c_int * 6)(B, T, G, H, D, S),
        ctypes.c_int64(max_smem),
        ctypes.c_int64(max_pass_bytes),
        ptr(grad),
        _strides(grad),
        ptr(dq),
        ptr(dk_acc),
        ptr(dv_acc),
        ptr(dbias),
    )
    if rc < 0:
        raise RuntimeError(lib.sb_emu_last_error().decode())
    as_key = lambda acc: acc.view(B, H, S, D).permute(0, 2, 1, 3).to(q.dtype)  # noqa: E731
    return dq, as_key(dk_acc), as_key(dv_acc), dbias, rc


def _ref_grads(q, k, v, bias, grad, scale, dtype, shared_kv, bias_grad):
    """Autograd of the reference in dtype: (dq, dk, dv, dbias) with dk = dv = the K=V gradient when shared."""
    qq = q.detach().to(dtype).requires_grad_()
    kk = k.detach().to(dtype).requires_grad_()
    vv = kk if shared_kv else v.detach().to(dtype).requires_grad_()
    bb = None if bias is None else bias.detach().to(torch.float64 if dtype == torch.float64 else torch.float32)
    if bb is not None:
        bb.requires_grad_(bias_grad)
    out = reference.sb_attention_ref(qq, kk, vv, bb, scale)
    leaves = [qq, kk] + ([] if shared_kv else [vv]) + ([bb] if bias_grad else [])
    got = list(torch.autograd.grad(out, leaves, grad.to(dtype)))
    dq, dk = got[0], got[1]
    dv = None if shared_kv else got[2]
    return dq, dk, dv, (got[-1] if bias_grad else None)


def _check(lib, q, k, v, bias, scale, what, **kw):
    out, passes = fused_forward(lib, q, k, v, bias, scale, **kw)
    assert torch.isfinite(out).all(), f"{what}: non-finite or unwritten output"
    exact = reference.sb_attention_ref(q.double(), k.double(), v.double(), bias, scale)
    lowp = reference.sb_attention_ref(q, k, v, bias, scale)
    assert_close(out, exact, lowp, q.dtype, what)
    return out, passes


# (B, T, S, k slots, H, D): row tiles partly filled, several key tiles, T < S (a cache before the queries), H > 1,
# the MoLM head (D = 1024), and a diagonal that is not aligned to the key tiles
CASES = [
    (1, 5, 5, 1, 1, 128),
    (2, 33, 70, 2, 1, 128),
    (1, 40, 130, 4, 2, 256),
    (1, 70, 70, 3, 1, 128),
    (1, 20, 100, 2, 1, 1024),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,S,G,H,D", CASES)
def test_fused_prefill_matches_reference(lib, B, T, S, G, H, D, dtype):
    padded = (T + G) % 2 == 1
    q, k, v, bias = sb_inputs(B, T, S, G, H, D, dtype, padded=padded, shared_kv=(B + T) % 2 == 0)
    out, _ = _check(lib, q, k, v, bias, D**-0.5, f"fused {dtype} B={B} T={T} S={S} k={G} H={H} D={D}")
    if padded and T > S // 2:  # fully padded query rows of batch 0 get exactly nothing
        assert torch.all(out[0, : S // 2 - (S - T)] == 0)


@pytest.mark.parametrize("exit_below", [-30.0, float("-inf")])
@pytest.mark.parametrize("shift", [30.0, -30.0, 8.0])  # all beta ~ 1, all beta ~ 0, mostly ~ 1
def test_fused_prefill_adversarial_logits(lib, shift, exit_below):
    q, k, v, bias = sb_inputs(1, 150, 150, 2, 1, 128, torch.bfloat16, shift=shift)
    first_key = torch.full((5,), -1, dtype=torch.int32)
    _check(lib, q, k, v, bias, 0.125, f"adversarial shift={shift}", exit_below=exit_below, first_key=first_key)
    # row tile 4 holds positions 128 .. 149: with beta ~ 1 a key or two use up the stick (the walk stops after key
    # tile 128 or 64), with beta ~ 0 nothing does
    walked_all = shift == -30.0 or exit_below == float("-inf")
    assert first_key[4].item() == 0 if walked_all else first_key[4].item() in (64, 128)


def test_fused_prefill_early_exit_skips_old_keys(lib):
    """Random logits (beta ~ 0.5): the stick is used up within a few dozen keys, so later row tiles stop walking
    early; the output stays within the bound of the exact reference and the early exit sets first_key."""
    q, k, v, bias = sb_inputs(1, 300, 300, 2, 1, 128, torch.bfloat16, seed=5)
    first_key = torch.full((10,), -1, dtype=torch.int32)
    out, _ = _check(lib, q, k, v, bias, 0.1, "early exit", first_key=first_key)
    # row tile t holds positions 32 t .. 32 t + 31; a tile stops after its diagonal key tile or the one before
    assert (first_key[4:] >= (torch.arange(4, 10) * 32 // 64 - 1) * 64).all() and (first_key[4:] > 0).all(), first_key
    assert (first_key % 64 == 0).all(), first_key
    full, _ = fused_forward(lib, q, k, v, bias, 0.1, exit_below=float("-inf"))
    assert (out.float() - full.float()).abs().max().item() <= 1e-6  # the skipped stick is below e^-30


def test_fused_prefill_small_smem_variant_and_passes(lib):
    """The BD = 32 kernel (A100's shared memory) and a weights budget that forces several passes give the same
    bits as one pass with BD = 64: the chunking changes no summation order."""
    q, k, v, bias = sb_inputs(1, 100, 120, 2, 1, 1024, torch.bfloat16, padded=True)
    one, passes = fused_forward(lib, q, k, v, bias, 1 / 32)
    assert passes == 100
    small, _ = fused_forward(lib, q, k, v, bias, 1 / 32, max_smem=A100_SMEM)
    split, passes = fused_forward(lib, q, k, v, bias, 1 / 32, max_weights_bytes=1 * 2 * 128 * 2 * 40)
    assert passes == 40
    assert torch.equal(one, split)
    # BD = 32 sums each score over D in a different order: the same result within rounding, held to the bound
    exact = reference.sb_attention_ref(q.double(), k.double(), v.double(), bias, 1 / 32)
    assert_close(small, exact, reference.sb_attention_ref(q, k, v, bias, 1 / 32), q.dtype, "BD = 32")


def test_fused_prefill_strided_inputs(lib):
    """q as a view of a wider projection and k = v as a strided slice of a cache, like the model passes them."""
    g = torch.Generator().manual_seed(3)
    B, T, S, G, D = 2, 24, 40, 2, 128
    qbig = torch.randn(B, T, G, 1, D + 64, generator=g).to(torch.bfloat16)
    cache = torch.randn(B, S + 8, 1, D, generator=g).to(torch.bfloat16)
    q, k = qbig[..., :D], cache[:, 8:]
    _check(lib, q, k, k, None, D**-0.5, "strided")


def test_fused_prefill_refuses_unsupported_head(lib):
    q, k, v, _ = sb_inputs(1, 8, 8, 1, 1, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="D = 64"):
        fused_forward(lib, q, k, v, None, 0.125)


def test_fused_prefill_refuses_misaligned_rows(lib):
    """Rows that do not start on 16 bytes (here q sliced one element into a wider projection) are refused by the
    entry point's check (sb_prefill::takes), which the CUDA build shares, before any 16-byte async copy."""
    q, k, v, _ = sb_inputs(1, 8, 8, 1, 1, 128, torch.bfloat16)
    wide = torch.zeros(*q.shape[:-1], 129, dtype=q.dtype)
    wide[..., 1:] = q
    with pytest.raises(RuntimeError, match="not taken by the fused path"):
        fused_forward(lib, wide[..., 1:], k, v, None, 0.125)


# (B, T, S, k slots, H, D): partial row tiles, a cache before the queries (T = 21: the rows of position 64 start at
# row 30, just before a 32-row step of kernel 3), H > 1, the MoLM head
BACKWARD_CASES = [
    (1, 6, 6, 1, 1, 128),
    (2, 33, 70, 2, 1, 128),
    (1, 21, 70, 2, 1, 128),
    (1, 20, 40, 3, 2, 128),
    (1, 12, 30, 2, 1, 1024),
]


@pytest.mark.parametrize("shared_kv", [True, False])
@pytest.mark.parametrize("B,T,S,G,H,D", BACKWARD_CASES)
def test_fused_backward_matches_reference(lib, B, T, S, G, H, D, shared_kv):
    dtype = torch.bfloat16
    padded = shared_kv
    q, k, v, bias = sb_inputs(B, T, S, G, H, D, dtype, padded=padded, shared_kv=shared_kv)
    if bias is None:
        bias = torch.zeros(B, S)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    scale = D**-0.5
    dq, dk, dv, dbias, _ = fused_backward(lib, grad, q, k, v, bias, scale, bias_grad=True)
    # the op returns separate dk and dv; with K = V the model's gradient is their sum
    got = {"dq": dq, "dkv": (dk.float() + dv.float()) if shared_kv else dk, "dbias": dbias}
    if not shared_kv:
        got["dv"] = dv
    exact = _ref_grads(
        q.double(), k.double(), v.double(), bias.double(), grad.double(), scale, torch.float64, shared_kv, True
    )
    lowp = _ref_grads(q, k, v, bias, grad, scale, dtype, shared_kv, True)
    names = ["dq", "dkv"] + ([] if shared_kv else ["dv"]) + ["dbias"]
    exact = dict(zip(["dq", "dkv", "dv", "dbias"], exact))
    lowp = dict(zip(["dq", "dkv", "dv", "dbias"], lowp))
    for name in names:
        assert torch.isfinite(got[name]).all(), f"{name}: non-finite or unwritten"
        assert_close(
            got[name],
            exact[name],
            lowp[name],
            dtype if name != "dbias" else torch.float32,
            f"{name} B={B} T={T} S={S} k={G} H={H} D={D} shared={shared_kv}",
        )


def test_fused_backward_passes_and_small_smem(lib):
    """Several passes (dk / dv accumulated across them) and the BD = 32 variant give the gradients of one pass."""
    q, k, v, bias = sb_inputs(1, 40, 50, 2, 1, 128, torch.float16, padded=True, shared_kv=False)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    one = fused_backward(lib, grad, q, k, v, bias, 0.1, bias_grad=True)
    assert one[4] == 40
    split = fused_backward(lib, grad, q, k, v, bias, 0.1, bias_grad=True, max_pass_bytes=12 * 2 * 64 * 16)
    assert split[4] == 16
    small = fused_backward(lib, grad, q, k, v, bias, 0.1, bias_grad=True, max_smem=A100_SMEM)
    for a, b, c in zip(one[:4], split[:4], small[:4]):
        # dq comes out of the same kernels in the same order; dk, dv and dbias are summed per pass in another order
        assert (a.float() - b.float()).abs().max() <= 2e-3 * a.float().abs().max().clamp_min(1)
        assert (a.float() - c.float()).abs().max() <= 2e-3 * a.float().abs().max().clamp_min(1)
