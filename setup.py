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
import site
import sys
import sysconfig

try:
    import torch
except ImportError as exc:  # most often: pip's isolated build environment, which has no torch
    sys.exit(f"molm setup.py: cannot import torch ({exc}). molm's extension is compiled against the torch you "
             "already have: install torch first (pip install torch), then install molm without build isolation: "
             "pip install --no-build-isolation -e .")
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
    return dirs if all(os.path.isfile(os.path.join(d, f)) for d, f in
                       zip(dirs, ("cutlass/cutlass.h", "cutlass/util/packed_stride.hpp"))) else []


def _nvcc() -> str | None:
    """The nvcc torch's builder would use ($CUDA_HOME/bin/nvcc, CUDA_HOME as torch finds it), or None."""
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    return nvcc if nvcc and os.path.isfile(nvcc) else None


def _extension():
    cpu_sources = ["csrc/ops.cpp", "csrc/bindings.cpp", *_rel(glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp")))]
    cxx_flags = ["-O3", "-fopenmp"]  # the -std flag comes from torch (C++17 code; torch >= 2.10 headers need C++20)
    use_cuda = torch.version.cuda is not None and os.environ.get("MOLM_CPU_ONLY", "0") != "1"
    if use_cuda and _nvcc() is None:
        print(f"molm setup.py: WARNING: torch is built with CUDA {torch.version.cuda} but no CUDA toolkit was found "
              "(nvcc not on PATH, CUDA_HOME not set): building the CPU kernels only. To build the CUDA kernels, "
              "install the CUDA toolkit and set CUDA_HOME (or put nvcc on PATH); set MOLM_CPU_ONLY=1 to silence "
              "this.", file=sys.stderr, flush=True)
        use_cuda = False
    if not use_cuda:
        return CppExtension("molm._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc/cuda/**/*.cu"), recursive=True))
    nvcc_flags = ["-O3", "--threads", "2", "-DMOLM_WITH_CUDA"]
    cutlass_dirs = _cutlass_include_dirs()
    if cutlass_dirs:
        # Only expert_gemm_sm90.cu uses it; its kernels have code for sm_90a only (other archs get CUTLASS's stub).
        nvcc_flags.append("-DMOLM_WITH_CUTLASS")
    else:
        print("molm setup.py: CUTLASS not found (pip install nvidia-cutlass, or set CUTLASS_PATH): building without "
              "the sm_90a CUTLASS grouped GEMM; Hopper GPUs use the WMMA expert GEMM", flush=True)
    return CUDAExtension(
        "molm._C", cpu_sources + cuda_sources, include_dirs=_cuda_include_dirs() + cutlass_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DMOLM_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"])


if __name__ == "__main__":  # pip, setuptools' build backend and `python setup.py` all run it as __main__
    setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
