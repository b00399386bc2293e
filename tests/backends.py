"""Backend parametrisation shared by the model-level tests.

The extension backend carries the `extension` marker (tests/conftest.py): skipped when molm._C is not built,
unless the extension is required (--require-extension, or MOLM_REQUIRE_EXTENSION=1 as CI sets), in which case a
missing build fails loudly instead of hiding behind a skip.
"""

import os

import pytest


def extension_built() -> bool:
    try:
        from molm import ops
    except ImportError:
        return False
    return ops.extension_available()


REQUIRE = os.environ.get("MOLM_REQUIRE_EXTENSION") == "1"  # for tests that pick backends inside their body
BACKENDS = ["reference", pytest.param("extension", marks=pytest.mark.extension)]
