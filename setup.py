"""Build of the molm._C extension (one extension, CPU kernels always, CUDA kernels when torch has CUDA).

Build with `pip install --no-build-isolation -e .` (torch must already be installed: the extension is compiled
against it). Switches:
  MOLM_CPU_ONLY=1          build the CPU kernels only, even with a CUDA torch
  TORCH_CUDA_ARCH_LIST     CUDA archs (default "8.0;9.0a")
  MAX_JOBS                 parallel compile jobs (torch's ninja builder reads it)
"""

import glob
import os
import site
import sysconfig

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_include_dirs():
    """site-packages/nvidia/cu13/include (cuBLAS etc. headers shipped with the CUDA torch wheel), if present."""
    roots = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    return [d for d in (os.path.join(r, "nvidia", "cu13", "include") for r in roots) if os.path.isdir(d)]


def _extension():
    cpu_sources = ["csrc/ops.cpp", "csrc/bindings.cpp", *_rel(glob.glob(os.path.join(ROOT, "csrc/cpu/*.cpp")))]
    cxx_flags = ["-O3", "-fopenmp"]  # the -std flag comes from torch (C++17 code; torch >= 2.10 headers need C++20)
    use_cuda = torch.version.cuda is not None and os.environ.get("MOLM_CPU_ONLY", "0") != "1"
    if not use_cuda:
        return CppExtension("molm._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc/cuda/**/*.cu"), recursive=True))
    return CUDAExtension(
        "molm._C", cpu_sources + cuda_sources, include_dirs=_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + ["-DMOLM_WITH_CUDA"],
                            "nvcc": ["-O3", "--threads", "2", "-DMOLM_WITH_CUDA"]},
        extra_link_args=["-fopenmp"])


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
