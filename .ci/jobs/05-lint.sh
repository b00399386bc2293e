#!/usr/bin/env bash
# Style: ruff (lint + format, configured in pyproject.toml) on the Python code, clang-format (.clang-format) on
# csrc/. Pinned versions, so a new release cannot fail a commit that did not change.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-ci-lint
.venv-ci-lint/bin/pip install -q ruff==0.17.6 clang-format==23.1.5
.venv-ci-lint/bin/ruff check .
.venv-ci-lint/bin/ruff format --check .
git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' |
  xargs .venv-ci-lint/bin/clang-format --dry-run --Werror
echo "--- ruff and clang-format: clean"
