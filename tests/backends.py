"""Backend parametrisation shared by the model-level tests.

The extension backend is skipped when molm._C is not built, unless MOLM_REQUIRE_EXTENSION=1 (CI sets it), in
which case a missing build fails loudly instead of hiding behind a skip.
"""

import os

import pytest


def extension_built() -> bool:
    try:
        from molm import ops
    except ImportError:
        return False
    return ops.extension_available()


REQUIRE = os.environ.get("MOLM_REQUIRE_EXTENSION") == "1"
BACKENDS = [
    "reference",
    pytest.param(
        "extension", marks=pytest.mark.skipif(not extension_built() and not REQUIRE, reason="molm._C not built")
    ),
]
