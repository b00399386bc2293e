"""The gather / scatter kernels of the MoE permutation (csrc/cuda/permute.cuh), run on the CPU emulator.

Both are exact: gather_rows copies rows, scatter_ksum sums the k slots of a token in slot order with products and sums
rounded separately (fp32, fp64 for fp64), so both must equal the reference bitwise. Outputs start as NaN, so a row
the kernel skips fails; out-of-range indices must give NaN rows (memory-safe without value checks). Widths and row
strides that are multiples of 16 bytes take the 16-byte vector path, the others the one-element path.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from molm import reference

from emu_build import load_emu_library

DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}
DTYPES = list(DTYPE_CODE)
I64 = ctypes.c_int64


@pytest.fixture(scope="module")
def lib():
    lib = load_emu_library("permute", ["tests/emu/permute_emu.cpp"])
    lib.permute_emu_last_error.restype = ctypes.c_char_p
    lib.gather_rows_emu.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        I64,
        ctypes.c_void_p,
        I64,
        I64,
        I64,
        I64,
        ctypes.c_void_p,
    ]
    lib.scatter_ksum_emu.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        I64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        I64,
        I64,
        I64,
        I64,
        ctypes.c_void_p,
    ]
    return lib


def _check(lib, rc):
    if rc != 0:
        raise RuntimeError(lib.permute_emu_last_error().decode())


def gather_rows(lib, x, index, group):
    """molm.gather_rows' CUDA kernel on the emulator: out[i] = x[index[i] // group]."""
    assert x.stride(1) == 1 and index.is_contiguous()
    out = torch.full((index.numel(), x.shape[1]), float("nan"), dtype=x.dtype)
    _check(
        lib,
        lib.gather_rows_emu(
            DTYPE_CODE[x.dtype],
            x.data_ptr(),
            x.stride(0),
            index.data_ptr(),
            index.numel(),
            group,
            x.shape[0],
            x.shape[1],
            out.data_ptr(),
        ),
    )
    return out


def scatter_ksum(lib, y, gates, pos):
    """molm.scatter_ksum's CUDA kernel on the emulator (gates converted to the accumulation type, as the op does)."""
    assert y.stride(1) == 1 and pos.is_contiguous()
    n, k = gates.shape
    g = gates.to(torch.float64 if y.dtype == torch.float64 else torch.float32).contiguous()
    out = torch.full((n, y.shape[1]), float("nan"), dtype=y.dtype)
    _check(
        lib,
        lib.scatter_ksum_emu(
            DTYPE_CODE[y.dtype],
            y.data_ptr(),
            y.stride(0),
            g.data_ptr(),
            pos.data_ptr(),
            n,
            k,
            y.shape[0],
            y.shape[1],
            out.data_ptr(),
        ),
    )
    return out


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# (n_rows, width, group, m): vector rows in every dtype; odd widths (element path); a width that is 16-byte whole
# only for 8-byte elements; k = 2 slots per token (group 2); one row gathered many times; rows that no index picks
# (an expert with no rows); more rows than threads in a block
GATHER_CASES = [(5, 64, 1, 7), (6, 13, 1, 9), (4, 2, 1, 5), (7, 24, 2, 11), (1, 8, 1, 6), (9, 300, 2, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_rows,width,group,m", GATHER_CASES)
def test_gather_rows_matches_reference(lib, n_rows, width, group, m, dtype):
    x = _randn(n_rows, width, dtype=dtype)
    index = torch.randint(0, n_rows * group, (m,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(gather_rows(lib, x, index, group), reference.gather_rows_ref(x, index, group))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_rows_strided_and_misaligned_source(lib, dtype):
    """x as a column window of a wider buffer: a row stride that is not the width, and a start that is not 16-byte
    aligned (the element path), or both aligned (the vector path)."""
    base = _randn(6, 40, dtype=dtype)
    index = torch.tensor([5, 0, 3, 3, 1])
    for start in (0, 1, 8):
        x = base[:, start : start + 16]
        assert torch.equal(gather_rows(lib, x, index, 1), reference.gather_rows_ref(x, index, 1)), f"start={start}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_rows_out_of_range_index_gives_nan_row(lib, dtype):
    x = _randn(3, 16, dtype=dtype)
    index = torch.tensor([2, -1, 6, 0])  # -1 and 6 (>= 3 rows * group 2) are out of range
    out = gather_rows(lib, x, index, 2)
    assert out[[1, 2]].isnan().all()
    assert torch.equal(out[[0, 3]], x[[1, 0]])


def _routing(n_tokens, k, n_experts, seed, skew=False):
    """slot_positions of a top-k routing sorted by expert: token n's slot j sits at row pos[n * k + j]."""
    g = torch.Generator().manual_seed(seed)
    experts = (
        torch.zeros(n_tokens * k, dtype=torch.long)
        if skew
        else torch.randint(0, n_experts, (n_tokens * k,), generator=g)
    )
    order = torch.argsort(experts * (n_tokens * k) + torch.arange(n_tokens * k))  # stable sort by expert
    pos = torch.empty_like(order)
    pos[order] = torch.arange(n_tokens * k)
    return pos


def _scatter_want(y, gates, pos):
    """The reference; for fp64 (which the kernel sums in fp64, the reference in fp32) its loop in fp64."""
    if y.dtype != torch.float64:
        return reference.scatter_ksum_ref(y, gates, pos)
    n_tokens, k = gates.shape
    rows, want = y[pos].view(n_tokens, k, y.shape[1]), torch.zeros(n_tokens, y.shape[1], dtype=torch.float64)
    for j in range(k):
        want += gates.double()[:, j, None] * rows[:, j]
    return want


# (n_tokens, k, width, all on one expert): vector rows; odd width (element path); k = 1; many slots; a single token;
# every token on one expert; a row wider than a block's threads
SCATTER_CASES = [
    (6, 2, 64, False),
    (5, 3, 13, False),
    (7, 1, 24, False),
    (3, 8, 16, False),
    (1, 2, 8, False),
    (4, 2, 32, True),
    (2, 2, 1040, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_tokens,k,width,skew", SCATTER_CASES)
def test_scatter_ksum_matches_reference(lib, n_tokens, k, width, skew, dtype):
    pos = _routing(n_tokens, k, 4, seed=n_tokens + k, skew=skew)
    y = _randn(n_tokens * k, width, dtype=dtype, seed=2)
    gates = torch.rand(n_tokens, k, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    assert torch.equal(scatter_ksum(lib, y, gates, pos), _scatter_want(y, gates, pos))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_ksum_strided_y_and_bad_position(lib, dtype):
    """y as a column window of a wider buffer (row stride != width; misaligned start: the element path), and one
    token with an out-of-range position, whose row becomes NaN while the others are exact."""
    pos = _routing(5, 2, 3, seed=7)
    base = _randn(10, 48, dtype=dtype, seed=4)
    gates = torch.rand(5, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64).float()
    for start in (0, 3):
        y = base[:, start : start + 16]
        assert torch.equal(scatter_ksum(lib, y, gates, pos), _scatter_want(y, gates, pos)), f"start={start}"
    bad = pos.clone()
    bad[3] = 10  # token 1, slot 1
    out = scatter_ksum(lib, base[:, :16], gates, bad)
    assert out[1].isnan().all() and not out[[0, 2, 3, 4]].isnan().any()
