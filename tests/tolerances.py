"""Per-dtype error floors and the comparison rule shared by the kernel tests.

Rule (style guide §11): a floating-point output passes when its error against the fp32 (fp64 for fp64) reference is
at most max(2 x the error of the reference run in the test dtype, the floor for that dtype). Errors are max-abs,
divided by max(1, max |reference|) so wide-ranged outputs are compared relatively.
"""

from __future__ import annotations

import torch

FLOORS = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def scaled_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max(1, max |ref|), computed in fp64."""
    if ref.numel() == 0:
        return 0.0
    ref64 = ref.double()
    return ((out.double() - ref64).abs().max() / ref64.abs().max().clamp_min(1.0)).item()


def assert_close(
    out: torch.Tensor,
    ref_exact: torch.Tensor,
    ref_lowp: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    what: str = "",
) -> None:
    """out (any dtype) vs ref_exact (the reference in fp32/fp64); ref_lowp: the reference run in the test dtype."""
    dtype = dtype or out.dtype
    bound = FLOORS[dtype]
    if ref_lowp is not None:
        bound = max(bound, 2 * scaled_error(ref_lowp, ref_exact))
    err = scaled_error(out, ref_exact)
    assert out.shape == ref_exact.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref_exact.shape)}"
    assert err <= bound, f"{what}: scaled error {err:.3e} > bound {bound:.3e} ({dtype})"
