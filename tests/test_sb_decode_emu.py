"""The split-KV decode kernels of sb_attention (csrc/cuda/sb_decode.cuh), run on the CPU emulator.

Same bound as the CUDA tests (tests/tolerances.py against the fp64 reference, the reference in the test dtype as the
low-precision yardstick); the output starts as NaN and the partial results are NaN-poisoned, so anything unwritten
or read before it is written fails. The SM count passed to the launch plan sets the chunking, so small counts give
one chunk per row and large ones many chunks combined newest to oldest.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from molm import reference

from emu_build import load_emu_library
from sb_cases import sb_inputs
from tolerances import assert_close

DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}


@pytest.fixture(scope="module")
def lib():
    lib = load_emu_library("sb_decode", ["tests/emu/sb_decode_emu.cpp"])
    lib.sb_decode_emu.restype = ctypes.c_int
    lib.sb_decode_emu_last_error.restype = ctypes.c_char_p
    return lib


def _strides(t):
    return (ctypes.c_int64 * (t.dim() - 1))(*t.stride()[:-1])


def decode(lib, q, k, v, bias, scale, sms):
    """molm's split-KV decode on the emulator -> (out, number of key chunks)."""
    B, T, G, H, D = q.shape
    S = k.shape[1]
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b = None if bias is None else bias.to(acc).contiguous()
    ptr = lambda t: None if t is None else ctypes.c_void_p(t.data_ptr())  # noqa: E731
    rc = lib.sb_decode_emu(
        DTYPE_CODE[q.dtype],
        ptr(q),
        _strides(q),
        ptr(k),
        _strides(k),
        ptr(v),
        _strides(v),
        ptr(b),
        ctypes.c_double(scale),
        (ctypes.c_int * 6)(B, T, G, H, D, S),
        sms,
        ptr(out),
    )
    if rc < 0:
        raise RuntimeError(lib.sb_decode_emu_last_error().decode())
    return out, rc


# (B, T, S, k slots, H, D, sms): one key; cached keys; T up to 4; k = 5 slots (two register groups); H > 1; the MoLM
# head; D = 12 and 20 (not a multiple of the 16-byte vector: the scalar-load path); many chunks (sms = 64)
CASES = [
    (1, 1, 1, 1, 1, 64, 4),
    (2, 1, 7, 2, 1, 64, 4),
    (1, 1, 700, 2, 1, 1024, 64),
    (2, 3, 100, 3, 2, 64, 16),
    (1, 4, 4, 2, 1, 128, 4),
    (1, 1, 300, 5, 2, 64, 32),
    (2, 1, 100, 2, 1, 12, 8),
    (1, 2, 200, 3, 1, 20, 8),
]


def _case(case, dtype):
    return pytest.param(*case, dtype, id="-".join(map(str, case)) + "-" + str(dtype).removeprefix("torch."))


@pytest.mark.parametrize(
    "B,T,S,G,H,D,sms,dtype",
    [
        *[_case(case, dtype) for case in CASES for dtype in (torch.bfloat16, torch.float32)],
        *[_case(case, dtype) for case in (CASES[3], CASES[6]) for dtype in (torch.float16, torch.float64)],
    ],
)
def test_decode_matches_reference(lib, B, T, S, G, H, D, sms, dtype):
    padded = (S + G) % 2 == 1
    q, k, v, bias = sb_inputs(B, T, S, G, H, D, dtype, padded, shared_kv=(B + T) % 2 == 0)
    out, n_chunks = decode(lib, q, k, v, bias, D**-0.5, sms)
    what = f"decode {dtype} B={B} T={T} S={S} k={G} H={H} D={D} chunks={n_chunks}"
    assert torch.isfinite(out).all(), f"{what}: non-finite or unwritten output"
    exact = reference.sb_attention_ref(q.double(), k.double(), v.double(), bias, D**-0.5)
    assert_close(out, exact, reference.sb_attention_ref(q, k, v, bias, D**-0.5), dtype, what)


def test_decode_chunking_and_adversarial_logits(lib):
    """Many chunks equal one chunk within rounding, also when beta ~ 1 (the newest chunk takes the whole stick) or
    beta ~ 0 (every chunk contributes a little)."""
    for shift in (0.0, 30.0, -30.0):
        q, k, v, bias = sb_inputs(1, 1, 600, 2, 1, 128, torch.float32, padded=False, shared_kv=True, shift=shift)
        one, n_one = decode(lib, q, k, v, bias, 0.1, sms=1)
        many, n_many = decode(lib, q, k, v, bias, 0.1, sms=128)
        assert n_one == 4 and n_many == 10  # chunks of 160 and of 64 keys
        exact = reference.sb_attention_ref(q.double(), k.double(), v.double(), bias, 0.1)
        for out in (one, many):
            assert_close(out, exact, dtype=torch.float32, what=f"shift={shift}")


def test_decode_strided_cache(lib):
    """k = v as a window of a preallocated [B, S_max, H * D] cache, q as a slice of a wider projection."""
    g = torch.Generator().manual_seed(2)
    cache = torch.randn(2, 90, 2 * 64, generator=g).to(torch.bfloat16)
    kv = cache[:, :50].unflatten(-1, (2, 64))
    q = torch.randn(2, 1, 2, 2, 96, generator=g).to(torch.bfloat16)[..., :64]
    out, _ = decode(lib, q, kv, kv, None, 0.125, sms=8)
    exact = reference.sb_attention_ref(q.double(), kv.double(), kv.double(), None, 0.125)
    assert_close(out, exact, reference.sb_attention_ref(q, kv, kv, None, 0.125), torch.bfloat16, "strided cache")


def test_decode_over_48k_of_shared_memory(lib):
    """k = 8 slots of D = 1024 in fp64 need 68 KiB of shared memory: the launch code must raise the kernel's limit
    (sb_decode::raise_smem_limit, which the CUDA entry point calls too) or the launch fails as it would on a GPU."""
    q, k, v, bias = sb_inputs(1, 1, 100, 8, 1, 1024, torch.float64, True, shared_kv=False)
    out, _ = decode(lib, q, k, v, bias, 1024**-0.5, sms=4)
    exact = reference.sb_attention_ref(q, k, v, bias, 1024**-0.5)
    assert_close(out, exact, dtype=torch.float64, what="decode k=8 D=1024 fp64")
