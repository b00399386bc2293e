"""Build of the molm._C extension (one extension, CPU kernels always, CUDA kernels when torch has CUDA).

Build with `pip install --no-build-isolation -e .` (torch must already be installed: the extension is compiled
against it). Switches:
  MOLM_CPU_ONLY=1          build the CPU kernels only, even with a CUDA torch (also the fallback, with a
                           warning, when torch has CUDA but no CUDA toolkit / nvcc is found)
  TORCH_CUDA_ARCH_LIST     CUDA archs (default "8.0;9.0a")
  MAX_JOBS                 parallel compile jobs (torch's ninja builder reads it)
  CUTLASS_PATH             CUTLASS source tree (default: the pip package nvidia-cutlass); without CUTLASS the
                           sm_90a grouped GEMM (csrc/cuda/expert_gemm_sm90.cu) is left out and Hopper uses WMMA
"""

import glob
import os
import re
import site
import sys
import sysconfig

try:
    import torch
except ImportError as exc:  # most often: pip's isolated build environment, which has no torch
    sys.exit(
        f"molm setup.py: cannot import torch ({exc}). molm's extension is compiled against the torch you "
        "already have: install torch first (pip install torch), then install molm without build isolation: "
        "pip install --no-build-isolation -e ."
    )
from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_include_dirs():
    """site-packages/nvidia/cu13/include (cuBLAS etc. headers shipped with the CUDA torch wheel), if present."""
    roots = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    return [d for d in (os.path.join(r, "nvidia", "cu13", "include") for r in roots) if os.path.isdir(d)]


def _cutlass_include_dirs():
    """CUTLASS headers: $CUTLASS_PATH/{include,tools/util/include}, else the nvidia-cutlass pip package's copy."""
    if os.environ.get("CUTLASS_PATH"):
        root = os.environ["CUTLASS_PATH"]
    else:
        try:
            import cutlass_library
        except ImportError:
            return []
        root = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    return (
        dirs
        if all(
            os.path.isfile(os.path.join(d, f))
            for d, f in zip(dirs, ("cutlass/cutlass.h", "cutlass/util/packed_stride.hpp"))
        )
        else []
    )


# -lstdc++ names the shared C++ runtime, the one torch's libraries use, ahead of anything the linker adds: some
# Python builds link extensions with -static-libstdc++, and a private copy of the runtime inside the extension
# never initialises its locale facets, so formatting a number into an error message fails (a truncated message)
# or crashes the process.
LINK_ARGS = ["-fopenmp", "-lstdc++"]


def cutlass_sm90a_usable(arch_list: str) -> tuple[bool, str]:
    """Whether the CUTLASS grouped GEMM may be built for this TORCH_CUDA_ARCH_LIST, and why not.

    Its kernels only exist for sm_90a: compiled for sm_90 (or JIT-compiled from compute_90 PTX) CUTLASS leaves a
    stub that prints an error and writes nothing. A Hopper GPU runs sm_90a code only when the list has 9.0a, and a
    plain 9.0 / 9.0+PTX entry beside it could be the variant the driver loads, so that is refused too.
    """
    archs = [a.strip() for a in arch_list.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    if not any(a.startswith("9.0a") for a in archs):
        return False, f"TORCH_CUDA_ARCH_LIST={arch_list!r} has no 9.0a"
    plain = [a for a in archs if a in ("9.0", "9.0+PTX")]
    if plain:
        return False, f"TORCH_CUDA_ARCH_LIST={arch_list!r} has {plain[0]} beside 9.0a"
    return True, ""


def _nvcc() -> str | None:
    """The nvcc torch's builder would use ($CUDA_HOME/bin/nvcc, CUDA_HOME as torch finds it), or None."""
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    return nvcc if nvcc and os.path.isfile(nvcc) else None


def _extension():
    cpu_sources = [
        "csrc/ops.cpp",
        "csrc/bindings.cpp",
        "csrc/kernel_options.cpp",
        "csrc/decode_runner.cpp",
        *_rel(glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp"))),
    ]
    cxx_flags = ["-O3", "-fopenmp"]  # the -std flag comes from torch (C++17 code; torch >= 2.10 headers need C++20)
    use_cuda = torch.version.cuda is not None and os.environ.get("MOLM_CPU_ONLY", "0") != "1"
    if use_cuda and _nvcc() is None:
        print(
            f"molm setup.py: WARNING: torch is built with CUDA {torch.version.cuda} but no CUDA toolkit was found "
            "(nvcc not on PATH, CUDA_HOME not set): building the CPU kernels only. To build the CUDA kernels, "
            "install the CUDA toolkit and set CUDA_HOME (or put nvcc on PATH); set MOLM_CPU_ONLY=1 to silence "
            "this.",
            file=sys.stderr,
            flush=True,
        )
        use_cuda = False
    if not use_cuda:
        return CppExtension("molm._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=LINK_ARGS)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc/cuda/**/*.cu"), recursive=True))
    # recorded for molm._C.build_info(); a preprocessor number, so no quoting reaches the shell
    defines = ["-DMOLM_WITH_CUDA", "-DMOLM_CUDA_ARCHS=" + re.sub(r"[^0-9A-Za-z.]", "_", arch_list)]
    nvcc_flags = ["-O3", "--threads", "2"]
    cutlass_dirs = _cutlass_include_dirs()
    cutlass_ok, why_not = cutlass_sm90a_usable(arch_list)
    if cutlass_dirs and cutlass_ok:
        defines.append("-DMOLM_WITH_CUTLASS")
    else:
        why_not = why_not or "CUTLASS not found (pip install nvidia-cutlass, or set CUTLASS_PATH)"
        print(
            f"molm setup.py: {why_not}: building without the sm_90a CUTLASS grouped GEMM; Hopper GPUs use the "
            "WMMA expert GEMM",
            flush=True,
        )
        cutlass_dirs = []
    return CUDAExtension(
        "molm._C",
        cpu_sources + cuda_sources,
        include_dirs=_cuda_include_dirs() + cutlass_dirs,
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags + defines},
        extra_link_args=LINK_ARGS,
    )


if __name__ == "__main__":  # pip, setuptools' build backend and `python setup.py` run it as __main__; tests import it
    setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
