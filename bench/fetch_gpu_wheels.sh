#!/usr/bin/env bash
# Downloads the Python packages that the GPU machine lacks (it has no internet) as py3.12 manylinux wheels into
# .gpu-wheels/ (git-ignored), for bench/gpu_check.sh to install with --no-index. The machine's image already has
# torch, pytest, hypothesis, safetensors, tokenizers, tqdm, numpy, ninja and pybind11; pass other names to add.
#   bash bench/fetch_gpu_wheels.sh [PACKAGE==VERSION ...]      (default: nvidia-cutlass, for the CUTLASS headers)
set -euo pipefail
cd "$(dirname "$0")/.."
packages=("$@")
[ ${#packages[@]} -gt 0 ] || packages=(nvidia-cutlass)
mkdir -p .gpu-wheels
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .gpu-wheels "${packages[@]}"
ls -la .gpu-wheels
du -sh .gpu-wheels  # everything carried to the GPU machine must stay under 64 MiB in all
