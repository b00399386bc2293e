"""The routing kernels of route_topk after the softmax (csrc/cuda/routing.cuh: top-k + per-chunk histogram, the
block-wide scan, the warp-wise placement), run on the CPU emulator against the reference.

Everything here is exact: gates are copies of probabilities, and the stable counting sort is integer arithmetic, so
the outputs must equal the reference bitwise (experts wherever the top k+1 probabilities have no tie). Outputs start
poisoned (-1 / NaN), so a slot the kernels miss fails.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from molm import reference

from emu_build import load_emu_library

DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}
I64, P = ctypes.c_int64, ctypes.c_void_p


@pytest.fixture(scope="module")
def lib():
    lib = load_emu_library("routing", ["tests/emu/routing_emu.cpp"])
    lib.routing_emu_last_error.restype = ctypes.c_char_p
    lib.routing_emu.argtypes = [ctypes.c_int, P, I64, I64, I64, P, P, P, P, P]
    return lib


def route(lib, probs, k):
    """The CUDA route_topk after its softmax, on the emulator -> gates, experts, sorted_slots, slot_positions,
    expert_offsets."""
    n, e = probs.shape
    gates = torch.full((n, k), float("nan"), dtype=probs.dtype)
    experts = torch.full((n, k), -1, dtype=torch.int64)
    sorted_slots, slot_positions = torch.full((n * k,), -1), torch.full((n * k,), -1)
    offsets = torch.full((e + 1,), -1)
    rc = lib.routing_emu(
        DTYPE_CODE[probs.dtype],
        probs.data_ptr(),
        n,
        e,
        k,
        gates.data_ptr(),
        experts.data_ptr(),
        sorted_slots.data_ptr(),
        slot_positions.data_ptr(),
        offsets.data_ptr(),
    )
    if rc != 0:
        raise RuntimeError(lib.routing_emu_last_error().decode())
    return gates, experts, sorted_slots, slot_positions, offsets


def _check(lib, logits, k):
    probs, r_gates, r_experts, *_ = reference.route_topk_ref(logits, k)
    gates, experts, *sort = route(lib, probs, k)
    assert torch.equal(gates, r_gates)
    top = torch.sort(probs.float(), dim=-1, descending=True).values[:, : k + 1]  # ties among the first k+1
    no_tie = (top[:, :-1] != top[:, 1:]).all(-1)
    assert torch.equal(experts[no_tie], r_experts[no_tie])
    assert torch.equal(probs.gather(1, experts), gates)
    for got, want in zip(sort, reference.sort_by_expert(experts, logits.shape[1])):
        assert torch.equal(got, want)
    return experts, sort[2]


def _logits(n, e, dtype, seed=0):
    return torch.randn(n, e, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# (N, E, k): one token and expert; k == E; no tokens (only the scan runs: offsets all 0); two 64-token chunks with
# k = 8; chunks over two placement blocks; k = E = 32 (more slots per chunk than a warp); a [E][chunks] histogram of
# 512 * 10 entries (two scan tiles of 4096)
ROUTE_CASES = [(1, 1, 1), (3, 4, 4), (0, 8, 2), (100, 8, 8), (300, 32, 1), (65, 32, 32), (600, 512, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,e,k", ROUTE_CASES)
def test_route_matches_reference(lib, n, e, k, dtype):
    _check(lib, _logits(n, e, dtype, seed=n + e), k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_route_other_dtypes(lib, dtype):
    _check(lib, _logits(130, 16, dtype, seed=1), 3)


def test_route_all_on_one_expert(lib):
    logits = _logits(200, 32, torch.float32, seed=3)
    logits[:, 5] += 100.0
    _, offsets = _check(lib, logits, 1)
    assert offsets.tolist() == [0] * 6 + [200] * 27


def test_route_ties_pick_lower_expert_and_nan_ranks_first(lib):
    probs = torch.zeros(4, 6)
    probs[1, 4] = probs[1, 2] = 1.0
    probs[3, 3] = float("nan")
    _, experts, *_ = route(lib, probs, 3)
    assert experts.tolist() == [[0, 1, 2], [2, 4, 0], [0, 1, 2], [3, 0, 1]]
