"""pytest plugin for the sanitizer job: registers the molm ops from the ASan/UBSan CMake build
(libmolm_ops.so, path in MOLM_ASAN_LIB) and stands it in for the `molm._C` Python extension, so the Python op
tests drive the sanitized kernels. Used as `python -m pytest -p asan_ops` with .ci on PYTHONPATH."""

import os
import sys
import types

import torch

assert "molm._C" not in sys.modules and "molm" not in sys.modules, "molm was imported before the asan_ops plugin"
torch.ops.load_library(os.environ["MOLM_ASAN_LIB"])
_C = types.ModuleType("molm._C", "the molm ops from the ASan/UBSan CMake build (libmolm_ops.so)")
_C.cpu_uses_avx2 = lambda: None  # the bindings' only function; unknown here
sys.modules["molm._C"] = _C
