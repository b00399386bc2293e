#!/usr/bin/env bash
# Sanitizer job: a separate debug build of the C++ CPU kernels with -fsanitize=address,undefined (CMake, in
# build/asan), then (1) the CTest C++ tests and (2) the Python op tests (tests/test_ops.py, tests/test_fuzz_ops.py)
# against that build: libmolm_ops.so stands in for molm._C (.ci/asan_ops.py) with libasan/libubsan preloaded into
# the (unsanitized) Python. Any ASan report or UBSan finding aborts the process and fails the job.
# Measured on the 2-core CI machine kind: see README "Reliability".
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
VENV=.venv-ci-sanitize
[ -x $VENV/bin/python ] || python3 -m venv $VENV
. $VENV/bin/activate
pip install -q torch==2.13.0 numpy safetensors tokenizers tqdm pytest hypothesis
command -v cmake >/dev/null || pip install -q cmake
echo "--- venv ready in $((SECONDS - start)) s"

TORCH_CMAKE=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
cmake -S . -B build/asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" \
  -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g $SAN" -DCMAKE_EXE_LINKER_FLAGS="$SAN" -DCMAKE_SHARED_LINKER_FLAGS="$SAN" >/dev/null
cmake --build build/asan -j "${MAX_JOBS:-2}"
# guard: the library really is instrumented (a flag lost on the way would make this job pass vacuously)
symbols=$(nm -D build/asan/libmolm_ops.so)
grep -q __asan_report_load <<<"$symbols" && grep -q __ubsan_handle <<<"$symbols"
echo "--- sanitized build done at $((SECONDS - start)) s"

# Leaks: torch and CPython keep allocations alive at exit by design, so leak checking would only report theirs.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir build/asan --output-on-failure
echo "--- CTest under ASan/UBSan passed at $((SECONDS - start)) s"

# Python is not built with ASan, so the runtimes are preloaded; new/delete mismatches between the unsanitized
# libtorch and the sanitized kernels are not bugs of ours.
export ASAN_OPTIONS=$ASAN_OPTIONS:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0
export MOLM_ASAN_LIB=$PWD/build/asan/libmolm_ops.so
# torch.compile and opcheck only re-run the same kernels through much slower machinery: left out. The fuzz
# profile runs 3x its CI examples here (~1,300 cases).
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)" PYTHONPATH=.ci:.
MOLM_FUZZ_EXAMPLES=3 python -m pytest -q -p asan_ops -p no:cacheprovider tests/test_ops.py tests/test_fuzz_ops.py \
  -k "not torch_compile and not opcheck"
python -m pytest -q -p asan_ops -p no:cacheprovider tests/test_model.py tests/test_generate.py -k "extension"
unset LD_PRELOAD
echo "--- Python op and model tests under ASan/UBSan passed at $((SECONDS - start)) s"

# The CUDA attention kernels on the CPU emulator (tests/emu_build.py, MOLM_EMU_SANITIZE): under ASan/UBSan a kernel
# access outside its buffers aborts; under TSan, where every emulated CUDA thread is an OS thread and each barrier
# orders exactly its participants, shared-memory accesses of different warps that no __syncthreads orders abort
# (both checked to fire on a deliberately broken kernel when this job was written). A few shapes each: ~1 thread per
# CUDA thread makes the instrumented runs slow.
EMU_TESTS="tests/test_sb_prefill_emu.py tests/test_sb_decode_emu.py"
LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)" MOLM_EMU_SANITIZE=address \
  python -m pytest -q -s -p no:cacheprovider $EMU_TESTS -k "2-33-70 or strided or 2-3-100-3-2-64-16"
echo "--- CUDA kernels on the emulator under ASan/UBSan passed at $((SECONDS - start)) s"
LD_PRELOAD="$(g++ -print-file-name=libtsan.so)" MOLM_EMU_SANITIZE=thread OMP_NUM_THREADS=1 \
  TSAN_OPTIONS=halt_on_error=1:report_signal_unsafe=0 \
  python -m pytest -q -s -p no:cacheprovider $EMU_TESTS \
  -k "(reference and 2-33-70 and dtype0) or (backward_matches and 1-21-70) or 2-3-100-3-2-64-16-bfloat16"
echo "--- CUDA kernels on the emulator under TSan passed at $((SECONDS - start)) s"
