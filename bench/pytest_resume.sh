#!/usr/bin/env bash
# pytest -v that survives a test which kills the process (a segfault, an abort): the run is repeated without the
# test that was running when the process died, at most MAX_CRASHES times, so one crash does not hide the results of
# the tests after it. Each attempt's output goes to LOG_PREFIX.N.log. Exit status: pytest's, or 99 after any crash.
# Usage: LOG_PREFIX=out/pytest_cuda bash bench/pytest_resume.sh PYTHON -m pytest ARGS...
set -uo pipefail
prefix=${LOG_PREFIX:-pytest}
max_crashes=${MAX_CRASHES:-3}
deselect=()
crashes=0
for ((attempt = 1; ; attempt++)); do
  log="$prefix.$attempt.log"
  "$@" -v "${deselect[@]}" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  # pytest exits 0..5; more means a signal ended the process (128 + N as a shell reports it)
  if ((rc <= 5)); then
    ((crashes)) && exit 99
    exit "$rc"
  fi
  # -v prints each test's id before running it, so the last id printed is the one that was running
  crashed=$(grep -oE '^tests/[^ ]+::[^ ]+' "$log" | tail -1)
  if [ -z "$crashed" ] || ((crashes >= max_crashes)); then
    echo "=== pytest ended with status $rc; not repeated" >&2
    exit "$rc"
  fi
  crashes=$((crashes + 1))
  echo "=== CRASHED (exit status $rc) in $crashed; running again without it" | tee -a "$prefix.crashes"
  deselect+=(--deselect "$crashed")
done
