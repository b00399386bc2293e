"""The grouped expert GEMM kernels (csrc/cuda/expert_gemm.cuh), run on the CPU emulator: the decode GEMV (M <= 32
rows in all), the WMMA tiles (bf16/fp16) and SIMT tiles (fp32/fp64) of the forward, and the weight-gradient tiles.

Same bound as the CUDA tests (tests/tolerances.py against the fp64 reference, the reference in the test dtype as the
low-precision yardstick). Outputs start as NaN and the GEMV's partial sums are NaN-poisoned, so anything unwritten or
read before it is written fails. The emulated WMMA adds exact products in fp32, so it checks tiling and indexing, not
the hardware's rounding.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from molm import reference

from emu_build import load_emu_library
from tolerances import assert_close

DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}
I64, P = ctypes.c_int64, ctypes.c_void_p
GEMV, TILES = 0, 1
GEMV_MAX_M = 32


@pytest.fixture(scope="module")
def lib():
    lib = load_emu_library("expert_gemm", ["tests/emu/expert_gemm_emu.cpp"])
    lib.expert_gemm_emu_last_error.restype = ctypes.c_char_p
    lib.expert_gemm_emu.argtypes = [ctypes.c_int, P, I64, P, P, P, I64, I64, I64, I64, ctypes.c_int, P]
    lib.expert_wgrad_emu.argtypes = [ctypes.c_int, P, P, P, P, P, I64, I64, I64, I64, P]
    return lib


def _check(lib, rc):
    if rc < 0:
        raise RuntimeError(lib.expert_gemm_emu_last_error().decode())
    return rc


def expert_gemm(lib, x, weight, offsets, activation="none"):
    """molm.expert_gemm's CUDA kernels on the emulator -> (out, path taken: GEMV or TILES)."""
    assert x.stride(1) == 1
    m, kdim = x.shape
    n_experts, _, n_out = weight.shape
    out = torch.full((m, n_out), float("nan"), dtype=x.dtype)
    path = _check(
        lib,
        lib.expert_gemm_emu(
            DTYPE_CODE[x.dtype],
            x.data_ptr(),
            x.stride(0),
            weight.data_ptr(),
            (I64 * 3)(*weight.stride()),
            offsets.data_ptr(),
            n_experts,
            m,
            kdim,
            n_out,
            int(activation == "gelu_new"),
            out.data_ptr(),
        ),
    )
    return out, path


def expert_wgrad(lib, x, g, offsets, n_experts):
    """molm.expert_gemm_wgrad's CUDA kernel on the emulator: grad_w[e] = x[rows of e]^T @ g[rows of e]."""
    m, kdim = x.shape
    gw = torch.full((n_experts, kdim, g.shape[1]), float("nan"), dtype=x.dtype)
    _check(
        lib,
        lib.expert_wgrad_emu(
            DTYPE_CODE[x.dtype],
            x.data_ptr(),
            (I64 * 2)(*x.stride()),
            g.data_ptr(),
            (I64 * 2)(*g.stride()),
            offsets.data_ptr(),
            n_experts,
            m,
            kdim,
            g.shape[1],
            gw.data_ptr(),
        ),
    )
    return gw


def _randn(*shape, dtype, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


def _inputs(rows, kdim, n_out, dtype, seed=0):
    offsets = torch.tensor([0] + rows).cumsum(0)
    x = _randn(sum(rows), kdim, dtype=dtype, seed=seed)
    weight = _randn(len(rows), kdim, n_out, dtype=dtype, seed=seed + 1, scale=kdim**-0.5)
    return x, weight, offsets


def _check_gemm(lib, x, weight, offsets, activation, what):
    out, path = expert_gemm(lib, x, weight, offsets, activation)
    exact = reference.expert_gemm_ref(x.double(), weight.double(), offsets, activation)
    lowp = reference.expert_gemm_ref(x, weight, offsets, activation) if x.dtype != torch.float32 else None
    what = f"{what} {x.dtype} {'GEMV' if path == GEMV else 'tiles'}"
    assert not out.isnan().any(), f"{what}: unwritten output"
    assert_close(out, exact, lowp, x.dtype, what)
    return path


# (rows per expert, K, Nout): empty experts around a single row; a segment of > 8 rows (two GEMV row groups), Nout
# not a multiple of 8 (element loads), K over two depth splits; all rows on one expert; M = 32 (the last GEMV size)
GEMV_CASES = [
    ([1, 0, 2, 0], 64, 128),
    ([9, 0, 3], 100, 36),
    ([0, 0, 5, 0], 130, 16),
    ([5] * 6 + [2], 24, 8),
    ([0, 32], 40, 24),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows,kdim,n_out", GEMV_CASES)
def test_gemv_matches_reference(lib, rows, kdim, n_out, dtype):
    activation = "gelu_new" if kdim % 2 == 0 else "none"
    x, weight, offsets = _inputs(rows, kdim, n_out, dtype)
    assert _check_gemm(lib, x, weight, offsets, activation, f"rows={rows}") == GEMV


# Tiles (WMMA for 16-bit, SIMT for fp32/fp64): M = 33 (just past the GEMV); empty experts and a row tile cut short;
# K and Nout not multiples of 8 (the element loads of the WMMA tile) nor of the tile; a segment over two row tiles of
# 64 (SIMT) and two column tiles; a segment over two row tiles of 128 (WMMA)
TILE_CASES = [([0, 33, 0], 32, 40), ([3, 17, 0, 15], 24, 20), ([70, 1, 0, 60], 48, 136), ([150, 0, 10], 40, 24)]


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("rows,kdim,n_out", TILE_CASES)
def test_tiles_match_reference(lib, rows, kdim, n_out, dtype):
    activation = "gelu_new" if n_out % 8 == 0 else "none"
    x, weight, offsets = _inputs(rows, kdim, n_out, dtype, seed=len(rows))
    assert _check_gemm(lib, x, weight, offsets, activation, f"rows={rows}") == TILES


def test_fp64_takes_tiles_at_any_m(lib):
    x, weight, offsets = _inputs([2, 0, 3], 20, 12, torch.float64)
    assert _check_gemm(lib, x, weight, offsets, "gelu_new", "fp64 small M") == TILES


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_strided_x_and_transposed_weight(lib, dtype):
    """x as a column window of a wider buffer (row stride != K; misaligned for the 16-byte loads), and the weight as a
    transposed view [E, Nout, K] -> [E, K, Nout] (not unit-stride along Nout: tiles even for few rows)."""
    base = _randn(40, 48, dtype=dtype, seed=3)
    w = _randn(3, 16, 24, dtype=dtype, seed=4, scale=0.2)  # [E, Nout, K]
    for m, start in ((8, 0), (8, 1), (40, 8), (40, 3)):
        x, offsets = base[:m, start : start + 24], torch.tensor([0, m // 4, m // 4, m])
        assert _check_gemm(lib, x, w.transpose(1, 2), offsets, "none", f"mT m={m} start={start}") == TILES
        weight = w.transpose(1, 2).contiguous()
        path = _check_gemm(lib, x, weight, offsets, "none", f"strided x m={m} start={start}")
        assert path == (GEMV if m <= GEMV_MAX_M else TILES)


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("rows,kdim,n_out", [([3, 0, 17, 5], 24, 20), ([0, 40, 1], 72, 16), ([0, 0], 8, 8)])
def test_wgrad_matches_reference(lib, rows, kdim, n_out, dtype):
    """Empty experts reduce over nothing (zeros); K = 72 spans two SIMT row tiles of 64."""
    x, _, offsets = _inputs(rows, kdim, n_out, dtype)
    g = _randn(sum(rows), n_out, dtype=dtype, seed=5)
    got = expert_wgrad(lib, x, g, offsets, len(rows))
    b = offsets.tolist()
    want = torch.stack([x[lo:hi].double().T @ g[lo:hi].double() for lo, hi in zip(b[:-1], b[1:])])
    lowp = torch.stack([x[lo:hi].T @ g[lo:hi] for lo, hi in zip(b[:-1], b[1:])]) if dtype != torch.float32 else None
    assert not got.isnan().any()
    assert_close(got, want, lowp, dtype, f"wgrad rows={rows} {dtype}")


def test_wgrad_strided_x(lib):
    x = _randn(30, 64, dtype=torch.float32)[:, ::2]  # stride(-1) == 2 is allowed for wgrad
    g = _randn(30, 16, dtype=torch.float32, seed=1)
    got = expert_wgrad(lib, x, g, torch.tensor([0, 10, 30]), 2)
    want = torch.stack([x[:10].double().T @ g[:10].double(), x[10:].double().T @ g[10:].double()])
    assert_close(got, want, dtype=torch.float32, what="wgrad strided x")
