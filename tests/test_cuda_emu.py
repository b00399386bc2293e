"""The CPU CUDA emulator (tests/cuda_emu/cuda_emu.h) through the CUDA-style kernels of tests/emu/selftest_kernels.cpp:
warp shuffles and votes, smem + barriers, early exits, async copies, a WMMA GEMM, 16-bit conversions, traps,
deadlocks and launch checks, each against numpy/torch references. Needs only a C++ compiler.
The checks that model what a GPU does but a CPU would hide (async copies that land at their wait, CTAs in no fixed
order and side by side, the 48 KiB default shared-memory limit, fragments holding only their lane's share) are each
shown to catch a deliberately broken kernel."""

from __future__ import annotations

import ctypes
import re
import time

import numpy as np
import pytest
import torch

from emu_build import load_emu_library

P = ctypes.c_void_p
I = ctypes.c_int  # noqa: E741  (ctypes signature shorthand)
LL = ctypes.c_longlong
SIGNATURES = {
    **{f"emu_warp_scan_{t}": [P, P, I] for t in ("f32", "f64", "i32", "u32", "i64")},
    "emu_vote": [P, P, P, I],
    "emu_lane_exit": [P, P, P, I, ctypes.c_uint],
    "emu_block_sum": [P, P, P, I, I, I, I, I, I],
    "emu_early_return": [P, P, I],
    "emu_smem_poison": [P, I],
    "emu_async_copy": [P, P, I, I],
    "emu_wmma_gemm": [I, P, P, P, P, I, I, I, ctypes.c_float, I, I],
    "emu_wmma_bad_load": [P, I, I],
    "emu_trap": [I, I, I],
    "emu_deadlock": [],
    "emu_launch_config": [I, I, I, I, LL],
    "emu_set_max_smem": [LL],
    "emu_async_early_read": [P, P, I],
    "emu_async_ring": [P, P, I, I],
    "emu_async_global_dst": [P, P],
    "emu_set_schedule": [ctypes.c_ulonglong, I, I],
    "emu_cta_order": [P, I],
    "emu_chain": [P, I],
    "emu_coresident": [P, I],
    "emu_smem_opt_in": [I, I],
    "emu_smem_launch": [I, LL],
    "emu_wmma_share": [P, P, I],
    "emu_wmma_changed_operand": [P, P],
    "emu_f2bf": [P, P, LL],
    "emu_bf2f": [P, P, LL],
    "emu_f2h": [P, P, LL],
    "emu_h2f": [P, P, LL],
    "emu_pairs": [ctypes.c_float, ctypes.c_float, P],
}


@pytest.fixture(scope="module")
def lib():
    lib = load_emu_library("selftest_kernels", ["tests/emu/selftest_kernels.cpp"])
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = None if name in ("emu_f2bf", "emu_bf2f", "emu_f2h", "emu_h2f", "emu_pairs") else I
    lib.emu_last_error.restype = ctypes.c_char_p
    return lib


def ptr(a: np.ndarray) -> int:
    assert a.flags.c_contiguous
    return a.ctypes.data


def aligned(a: np.ndarray, align: int = 64) -> np.ndarray:
    """A C-contiguous copy of `a` at an `align`-byte boundary (WMMA pointers must be 32-byte aligned)."""
    raw = np.empty(a.nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    out = raw[off : off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def check(lib, status: int) -> None:
    assert status == 0, lib.emu_last_error().decode()


def error_of(lib, status: int) -> str:
    assert status == -1, "the launch should have failed"
    return lib.emu_last_error().decode()


# ---- warp shuffles and votes -----------------------------------------------------------------------------------------


def warp_scan_reference(x: np.ndarray) -> np.ndarray:
    w = x.reshape(-1, 32)
    lane = np.arange(32)
    seg8 = w.reshape(-1, 4, 8)
    down3 = np.where(lane % 16 + 3 < 16, np.minimum(lane + 3, 31), lane)
    outs = [
        np.broadcast_to(w.sum(1, keepdims=True), w.shape),
        np.cumsum(w, 1),
        np.cumsum(w[:, ::-1], 1)[:, ::-1],
        w[:, (7 * lane + 3) % 32],
        np.cumsum(seg8, 2).reshape(w.shape),
        np.broadcast_to(seg8.sum(2, keepdims=True), seg8.shape).reshape(w.shape),
        w[:, down3],
        w[:, (lane & 16) | ((lane + 5) & 15)],
    ]
    return np.stack([o.reshape(-1) for o in outs]).astype(x.dtype)


@pytest.mark.parametrize(
    "suffix,dtype", [("f32", np.float32), ("f64", np.float64), ("i32", np.int32), ("u32", np.uint32), ("i64", np.int64)]
)
def test_warp_shuffles_scans_and_reductions(lib, suffix, dtype):
    n = 256  # 2 CTAs of 4 warps
    x = np.random.default_rng(0).integers(0, 1000, n).astype(dtype)  # integers: every order of addition is exact
    if dtype == np.int64:
        x += np.int64(1) << 40  # needs all 8 bytes of the exchange
    out = np.zeros((8, n), dtype)
    check(lib, getattr(lib, f"emu_warp_scan_{suffix}")(ptr(x), ptr(out), n))
    ref = warp_scan_reference(x)
    for k in range(8):
        np.testing.assert_array_equal(out[k], ref[k], err_msg=f"output {k}")


def test_votes(lib):
    n = 128
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 2, n).astype(np.int32)
    pred[:32] = 1  # one warp all true, one all false
    pred[32:64] = 0
    key = rng.integers(0, 4, n).astype(np.int32)
    out = np.zeros((5, n), np.uint32)
    check(lib, lib.emu_vote(ptr(pred), ptr(key), ptr(out), n))
    for w in range(n // 32):
        p, k = pred[32 * w : 32 * w + 32], key[32 * w : 32 * w + 32]
        ballot = sum(1 << i for i in range(32) if p[i])
        s = slice(32 * w, 32 * w + 32)
        assert (out[0, s] == ballot).all()
        assert (out[1, s] == int(p.any())).all()
        assert (out[2, s] == int(p.all())).all()
        match = [sum(1 << j for j in range(32) if k[j] == k[i]) for i in range(32)]
        np.testing.assert_array_equal(out[3, s], match)
        assert (out[4, s] == 0xFFFFFFFF).all()


def test_exited_lanes_and_masks(lib):
    x = np.arange(32, dtype=np.float32)
    sums, active = np.zeros(16, np.float32), np.zeros(16, np.uint32)
    for mask in (0xFFFFFFFF, 0x0000FFFF):  # a mask may omit lanes that have exited
        check(lib, lib.emu_lane_exit(ptr(x), ptr(sums), ptr(active), 8, mask))
        assert (sums == x[:16].sum()).all() and (active == 0xFFFF).all()
    msg = error_of(lib, lib.emu_lane_exit(ptr(x), ptr(sums), ptr(active), 16, 0xFFFFFFFF))
    assert re.search(r"lane \d+ reads lane \d+, which has exited", msg)  # whichever lane traps first
    assert "mask must include every live lane" in error_of(
        lib, lib.emu_lane_exit(ptr(x), ptr(sums), ptr(active), 8, 0xFF)
    )


# ---- CTAs: smem, barriers, indices, early exits ----------------------------------------------------------------------


def test_block_reduction_multi_cta_2d_grid(lib):
    gx, gy, block, reps = 3, 2, (32, 4, 2), 5
    nt = 256
    x = np.random.default_rng(2).integers(-50, 50, gx * gy * nt).astype(np.float32)
    sums = np.zeros(gx * gy, np.float32)
    ids = np.zeros((gx * gy, 6), np.uint32)
    check(lib, lib.emu_block_sum(ptr(x), ptr(sums), ptr(ids), gx, gy, *block, reps))
    np.testing.assert_array_equal(sums, reps * x.reshape(-1, nt).sum(1))
    for cta in range(gx * gy):
        assert ids[cta].tolist() == [cta % gx, cta // gx, 0, gx, gy, nt]


def test_barriers_are_fast(lib):
    x = np.ones(256, np.float32)
    sums, ids = np.zeros(1, np.float32), np.zeros(6, np.uint32)
    t0 = time.perf_counter()
    check(lib, lib.emu_block_sum(ptr(x), ptr(sums), ptr(ids), 1, 1, 256, 1, 1, 10))  # 10 x 10 __syncthreads
    elapsed = time.perf_counter() - t0
    assert sums[0] == 2560
    assert elapsed < 1.0, f"256 threads x 100 barriers took {elapsed:.2f} s"


@pytest.mark.parametrize("rows", [19, 8, 1])
def test_early_return_of_whole_warps_before_syncthreads(lib, rows):
    x = np.random.default_rng(3).integers(-9, 9, (rows, 32)).astype(np.float32)
    out = np.full(rows, np.nan, np.float32)
    check(lib, lib.emu_early_return(ptr(x), ptr(out), rows))
    s = x.sum(1)
    np.testing.assert_array_equal(out, s + s[(np.arange(rows) // 8) * 8])


def test_dynamic_smem_is_poisoned_for_every_cta(lib):
    out = np.zeros((3, 64), np.uint32)
    check(lib, lib.emu_smem_poison(ptr(out), 3))
    assert (out == 0xFFFFFFFF).all()


@pytest.mark.parametrize("size", [4, 8, 16])
def test_async_copy_zero_fill(lib, size):
    src = aligned(np.arange(1, 33, dtype=np.uint8))
    for zfill in range(size + 1):
        dst = np.full(32, 0xAB, np.uint8)
        check(lib, lib.emu_async_copy(ptr(src), ptr(dst), size, zfill))
        np.testing.assert_array_equal(dst[: size - zfill], src[: size - zfill])
        assert (dst[size - zfill : size] == 0).all() and (dst[size:] == 0xAB).all()
    dst = np.zeros(32, np.uint8)
    assert "aligned" in error_of(lib, lib.emu_async_copy(ptr(src[1:]), ptr(dst), size, 0))
    assert "4, 8 or 16" in error_of(lib, lib.emu_async_copy(ptr(src), ptr(dst), 12, 0))


# ---- WMMA ------------------------------------------------------------------------------------------------------------


def bits16(x: torch.Tensor) -> np.ndarray:
    return aligned(x.contiguous().view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b_row", [1, 0])
@pytest.mark.parametrize("d_row", [1, 0])
@pytest.mark.parametrize("mnk", [(64, 48, 80), (48, 16, 40)])
def test_wmma_gemm(lib, dtype, b_row, d_row, mnk):
    m, n, k = mnk
    g = torch.Generator().manual_seed(4)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    c0 = torch.randn(m, n, generator=g)
    alpha = 0.75
    b_store = b if b_row else b.t()  # col-major B is stored [N, K]
    d = aligned(np.full((m, n) if d_row else (n, m), np.nan, np.float32))
    a_bits, b_bits, c0_np = bits16(a), bits16(b_store), aligned(c0.numpy())  # held: ptr() keeps no reference
    status = lib.emu_wmma_gemm(
        0 if dtype == torch.bfloat16 else 1, ptr(a_bits), ptr(b_bits), ptr(c0_np), ptr(d), m, n, k, alpha, b_row, d_row
    )
    check(lib, status)
    got = torch.from_numpy(d if d_row else d.T.copy()).double()
    ref = alpha * (a.double() @ b.double()) + c0.double()
    bound = alpha * (a.double().abs() @ b.double().abs()) + c0.double().abs()
    err = (got - ref).abs()
    assert (err <= 1e-5 * bound + 1e-6).all(), f"max error {err.max().item():.3g}"  # fp32 accumulation


def test_wmma_checks_ldm_and_alignment(lib):
    p = aligned(np.zeros(16 * 40, np.float32))
    check(lib, lib.emu_wmma_bad_load(ptr(p), 20, 0))
    assert "ldm = 18 must be a multiple of 4" in error_of(lib, lib.emu_wmma_bad_load(ptr(p), 18, 0))
    assert "32-byte" in error_of(lib, lib.emu_wmma_bad_load(ptr(p), 16, 4))


# ---- failures and launch checks --------------------------------------------------------------------------------------


def test_trap_is_an_error_not_a_crash(lib):
    msg = error_of(lib, lib.emu_trap(3, 1, 5))
    assert "trap: boom" in msg and "block 1,0,0" in msg and "thread 5" in msg
    check(lib, lib.emu_trap(3, -1, 0))  # no trap: the next launch is unaffected


def test_deadlock_is_detected(lib):
    assert "deadlock" in error_of(lib, lib.emu_deadlock())


def test_launch_configuration_checks(lib):
    check(lib, lib.emu_launch_config(32, 2, 1, 2, 48 * 1024))
    assert "whole warps" in error_of(lib, lib.emu_launch_config(48, 1, 1, 1, 0))
    assert "whole warps" in error_of(lib, lib.emu_launch_config(32, 33, 1, 1, 0))
    assert "grid" in error_of(lib, lib.emu_launch_config(32, 1, 1, 0, 0))
    assert "232448" in error_of(lib, lib.emu_launch_config(32, 1, 1, 1, 232449))
    assert "opt-in" in error_of(lib, lib.emu_set_max_smem(232449))
    try:
        check(lib, lib.emu_set_max_smem(1024))
        assert "1024" in error_of(lib, lib.emu_launch_config(32, 1, 1, 1, 2048))
    finally:
        check(lib, lib.emu_set_max_smem(232448))


CUDA_SUCCESS, CUDA_ERROR_INVALID_VALUE = 0, 1


def test_dynamic_smem_over_48k_needs_the_kernels_opt_in(lib):
    """Above 48 KiB a launch fails unless cudaFuncSetAttribute(MaxDynamicSharedMemorySize) raised that kernel's limit
    (a GPU refuses the launch; a forgotten opt-in passed the emulator before)."""
    check(lib, lib.emu_smem_launch(1, 48 * 1024))
    msg = error_of(lib, lib.emu_smem_launch(1, 48 * 1024 + 16))
    assert "limit of 49152 B" in msg and "cudaFuncSetAttribute" in msg
    assert lib.emu_smem_opt_in(0, 100_000) == CUDA_SUCCESS
    check(lib, lib.emu_smem_launch(0, 100_000))
    assert "limit of 100000 B" in error_of(lib, lib.emu_smem_launch(0, 100_001))
    assert "limit of 49152 B" in error_of(lib, lib.emu_smem_launch(1, 100_000))  # the limit is per kernel
    assert lib.emu_smem_opt_in(1, 232449) == CUDA_ERROR_INVALID_VALUE  # above the device's opt-in maximum
    assert lib.emu_smem_opt_in(0, 232448) == CUDA_SUCCESS
    check(lib, lib.emu_smem_launch(0, 232448))


# ---- async copies land at their wait ---------------------------------------------------------------------------------


def test_async_copy_lands_only_at_its_wait(lib):
    src = aligned(np.arange(1, 17, dtype=np.uint8))
    dst = np.zeros(16, np.uint8)
    check(lib, lib.emu_async_early_read(ptr(src), ptr(dst), 0))
    np.testing.assert_array_equal(dst, src)
    check(lib, lib.emu_async_early_read(ptr(src), ptr(dst), 1))
    assert (dst == 0xFF).all()  # read before the wait: poison, not the data


def test_async_ring_with_a_wrong_wait_count_reads_poison(lib):
    chunks = 6
    x = aligned(np.random.default_rng(7).integers(-20, 20, (chunks, 32, 4)).astype(np.float32))
    out = np.zeros(32, np.float32)
    check(lib, lib.emu_async_ring(ptr(x), ptr(out), chunks, 1))
    np.testing.assert_array_equal(out, x.sum((0, 2)))
    check(lib, lib.emu_async_ring(ptr(x), ptr(out), chunks, 2))  # the broken wait count
    assert np.isnan(out).all()


def test_async_copy_destination_must_be_shared_memory(lib):
    src = aligned(np.arange(16, dtype=np.uint8))
    dst = aligned(np.zeros(16, np.uint8))
    assert "must lie in the CTA's shared memory" in error_of(lib, lib.emu_async_global_dst(ptr(src), ptr(dst)))


# ---- CTA order and concurrency ---------------------------------------------------------------------------------------


def test_ctas_run_in_a_seeded_shuffled_order(lib):
    ctas = 64
    try:
        orders = []
        for seed in (1, 1, 2):
            check(lib, lib.emu_set_schedule(seed, 1, 1))  # one slot: the order is the seeded permutation
            order = np.zeros(ctas, np.uint32)
            check(lib, lib.emu_cta_order(ptr(order), ctas))
            assert sorted(order.tolist()) == list(range(ctas))
            orders.append(order)
        np.testing.assert_array_equal(orders[0], orders[1])  # reproducible from the seed
        assert (orders[0] != np.arange(ctas)).any() and (orders[0] != orders[2]).any()
        check(lib, lib.emu_set_schedule(1, 1, 0))  # unshuffled: index order, where the broken chain works
        out = np.zeros(ctas, np.float32)
        check(lib, lib.emu_chain(ptr(out), ctas))
        np.testing.assert_array_equal(out, np.arange(1, ctas + 1))
    finally:
        check(lib, lib.emu_set_schedule(0x5EED, 2, 1))
    out = np.zeros(ctas, np.float32)
    check(lib, lib.emu_chain(ptr(out), ctas))
    assert (out != np.arange(1, ctas + 1)).any(), "a kernel relying on CTA order passed"


def test_two_ctas_are_resident_at_once(lib):
    seen = np.zeros(2, np.int32)
    check(lib, lib.emu_coresident(ptr(seen), 2))
    assert seen.tolist() == [2, 2]


# ---- WMMA fragments hold their lane's share --------------------------------------------------------------------------


def test_wmma_fragment_holds_only_its_lanes_share(lib):
    c = aligned(np.random.default_rng(8).standard_normal((16, 16)).astype(np.float32))
    out = aligned(np.full((16, 16), np.nan, np.float32))
    check(lib, lib.emu_wmma_share(ptr(c), ptr(out), 0))
    np.testing.assert_array_equal(out, c)
    check(lib, lib.emu_wmma_share(ptr(c), ptr(out), 1))  # elementwise on x[]: portable
    np.testing.assert_array_equal(out, 2 * c)
    out[...] = np.nan
    check(lib, lib.emu_wmma_share(ptr(c), ptr(out), 2))  # lane 0 treats x[] as the row-major tile
    assert not np.array_equal(out, c) and np.isnan(out).sum() == 256 - 8
    msg = error_of(lib, lib.emu_wmma_share(ptr(c), ptr(out), 3))  # lanes 8..31 index past their share
    index = re.search(r"fragment x\[(\d+)\]: a lane holds 8 elements", msg)
    assert index and int(index[1]) >= 8, msg


def test_wmma_changed_operand_elements_trap(lib):
    a = bits16(torch.randn(16, 16).to(torch.bfloat16))
    out = aligned(np.zeros((16, 16), np.float32))
    assert "changed through x[]" in error_of(lib, lib.emu_wmma_changed_operand(ptr(a), ptr(out)))


# ---- 16-bit conversions ----------------------------------------------------------------------------------------------

ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def float_bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, np.float32).view(np.uint32)


def test_bf16_to_float_all_patterns(lib):
    out = np.zeros(1 << 16, np.float32)
    lib.emu_bf2f(ptr(ALL16), ptr(out), len(ALL16))
    ref = torch.from_numpy(ALL16.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(float_bits(out), float_bits(ref))


def test_fp16_to_float_all_patterns(lib):
    out = np.zeros(1 << 16, np.float32)
    lib.emu_h2f(ptr(ALL16), ptr(out), len(ALL16))
    ref = ALL16.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert nan.sum() == 2 * 1023 and np.isnan(out[nan]).all()
    np.testing.assert_array_equal(float_bits(out)[~nan], float_bits(ref)[~nan])


def conversion_inputs() -> np.ndarray:
    """1e6+ floats: every bit pattern class (random bits: subnormals, inf, NaN), exact ties and their neighbours for
    both 16-bit formats, values around the fp16 subnormal and overflow ranges."""
    rng = np.random.default_rng(5)
    parts = [rng.integers(0, 1 << 32, 400_000, dtype=np.uint64).astype(np.uint32)]
    bf = rng.integers(0, 1 << 16, 100_000).astype(np.uint32) << 16
    parts += [bf | 0x8000, bf | 0x7FFF, bf | 0x8001]  # bf16 ties and neighbours
    h = float_bits(rng.integers(0, 1 << 16, 100_000).astype(np.uint16).view(np.float16).astype(np.float32))
    finite_h = h[(h & 0x7F800000) != 0x7F800000]
    # Adding half of a 2^-24 subnormal step is not a tie in general: these ties come from the magnitude by exponent.
    exp = np.maximum(((finite_h >> 23) & 0xFF).astype(np.int64) - 127, -14)  # fp16 spacing 2^(exp-10)
    vals = finite_h.view(np.float32).astype(np.float64)
    for frac in (0.5, 0.5 - 2**-14, 0.5 + 2**-14):
        parts.append(float_bits((vals + np.sign(vals + 0.1) * frac * 2.0 ** (exp - 10)).astype(np.float32)))
    mag = rng.uniform(-30, 17, 100_000)
    parts.append(float_bits((2.0**mag * rng.choice([-1, 1], mag.size)).astype(np.float32)))
    parts.append(
        float_bits(
            np.array(
                [
                    0.0,
                    -0.0,
                    65504,
                    65519.996,
                    65520,
                    65536,
                    2**-24,
                    2**-25,
                    2**-25 * 1.0001,
                    3 * 2**-26,
                    np.inf,
                    -np.inf,
                    np.nan,
                    1e-45,
                    3.4e38,
                ],
                np.float32,
            )
        )
    )
    return np.concatenate(parts).view(np.float32)


def test_float_to_bf16_and_fp16_bitwise(lib):
    x = conversion_inputs()
    assert x.size >= 1_000_000
    nan = np.isnan(x)
    bf = np.zeros(x.size, np.uint16)
    lib.emu_f2bf(ptr(x), ptr(bf), x.size)
    ref_bf = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf[~nan], ref_bf[~nan])
    assert (bf[nan] == 0x7FFF).all()  # CUDA's canonical NaN
    h = np.zeros(x.size, np.uint16)
    lib.emu_f2h(ptr(x), ptr(h), x.size)
    with np.errstate(over="ignore"):
        ref_h = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(h[~nan], ref_h[~nan])
    assert (h[nan] == 0x7FFF).all()


def test_pairs_put_the_first_value_low(lib):
    out = np.zeros(4, np.uint16)
    lib.emu_pairs(1.00390625, -3.3, ptr(out))  # 1 + 2^-8: a bf16 tie (rounds to 1.0)
    a = np.array([1.00390625, -3.3], np.float32)
    assert out[:2].tolist() == torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).tolist()
    assert out[2:].tolist() == a.astype(np.float16).view(np.uint16).tolist()
