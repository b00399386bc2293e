"""Shared fixtures."""

import pytest


@pytest.fixture
def kernel_options():
    """Set molm's CUDA kernel options (molm.ops.set_kernel_options) for one test; restored afterwards."""
    from molm import ops

    saved = ops.kernel_options()
    yield lambda **options: ops.set_kernel_options(**options)
    ops.set_kernel_options(**saved)
