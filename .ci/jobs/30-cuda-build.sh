#!/usr/bin/env bash
# CI (no GPU): compile the CUDA kernels against a CUDA torch for sm_80 and sm_90a, import the result as molm._C and
# check that every molm op has a CUDA kernel. Built out of place (build/ci-cuda-*) so the main job's in-place CPU
# extension stays untouched.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-ci-cuda
. .venv-ci-cuda/bin/activate
pip install -q torch==2.14.1 setuptools wheel ninja pybind11 numpy nvidia-cutlass
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST="8.0;9.0a" MAX_JOBS=${MAX_JOBS:-2}
python -c "import torch; assert torch.version.cuda, 'the CUDA job needs a CUDA build of torch'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
python setup.py -q build_ext --build-temp build/ci-cuda-tmp --build-lib build/ci-cuda-lib
python - <<'PY'
import glob, importlib.util, sys
import torch

so = glob.glob("build/ci-cuda-lib/molm/_C*.so")
assert len(so) == 1, f"expected one built extension, found {so}"
spec = importlib.util.spec_from_file_location("molm._C", so[0])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # registers the ops, CPU and CUDA kernels
ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("molm::"))
assert ops, "molm._C registered no ops"
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"molm::{n}", "CUDA")]
print("molm ops:", ops, "| without a CUDA kernel:", missing or "none")
assert not missing, f"no CUDA kernel registered for {missing}"
info = module.build_info()
print("build info:", info)
assert info["cuda"] and info["cuda_archs"] == "8.0_9.0a" and info["cutlass_sm90a"], info
PY
