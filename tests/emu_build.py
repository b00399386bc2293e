"""Builds C++ sources that include the CPU CUDA emulator (tests/cuda_emu/cuda_emu.h) into a shared library for
ctypes, so CUDA kernel source can be tested on machines without a GPU."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emu"  # the CPU emulator of CUDA (test support, not shipped)
FLAGS = ["-O2", "-std=c++17", "-pthread", "-shared", "-fPIC", "-DMOLM_CUDA_EMU"]
# MOLM_EMU_SANITIZE=address or =thread builds instrumented libraries (the sanitizer runtime must be preloaded into
# Python): ASan catches a kernel reading or writing outside its buffers; TSan, since every emulated CUDA thread is an
# OS thread and the emulator's barriers are mutexes, catches shared-memory accesses that no __syncthreads orders.
SANITIZE = {
    "address": [
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=undefined",
    ],
    "thread": ["-O1", "-g", "-fsanitize=thread"],
}
HEADER_SUFFIXES = {".h", ".cuh", ".hpp", ".inl"}


def _compiler() -> str | None:
    for name in ("c++", "g++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _newest_input(sources: list[Path]) -> float:
    # every header under csrc/ (kernel headers include csrc/cpu/core/ too) and the emulator's
    headers = [p for d in (ROOT / "csrc", EMU) for p in d.rglob("*") if p.suffix in HEADER_SUFFIXES]
    return max(p.stat().st_mtime for p in [*sources, *headers])


def load_emu_library(name: str, sources: list[str]) -> ctypes.CDLL:
    """Compiles `sources` (paths relative to the repo root) into build/emu/<name>.so unless it is newer than they and
    every header under csrc/, and loads it. Skips the calling test module when no C++ compiler exists."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (c++ or g++) on PATH: the CUDA emulator tests need one", allow_module_level=True)
    srcs = [ROOT / s for s in sources]
    sanitize = os.environ.get("MOLM_EMU_SANITIZE", "")
    if sanitize and sanitize not in SANITIZE:
        raise ValueError(f"MOLM_EMU_SANITIZE={sanitize!r}: expected one of {sorted(SANITIZE)}")
    out = ROOT / "build" / "emu" / (f"{name}-{sanitize}.so" if sanitize else f"{name}.so")
    if not out.exists() or out.stat().st_mtime < _newest_input(srcs):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # renamed into place: runs never see half a file
        includes = [f"-I{ROOT / 'csrc'}", f"-I{EMU}"]
        cmd = [cxx, *FLAGS, *SANITIZE.get(sanitize, []), *includes, *map(str, srcs), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"emulator build of {name} failed:\n{' '.join(cmd)}\n{res.stderr}")
        os.replace(tmp, out)
    return ctypes.CDLL(str(out))
