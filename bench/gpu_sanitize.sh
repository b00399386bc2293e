#!/usr/bin/env bash
# GPU sanitizer pass, for a machine with a CUDA device (bench/gpu_check.sh calls it): the CUDA tests (`pytest -m
# cuda`, or those SANITIZE_CASES selects) once under compute-sanitizer memcheck and once under racecheck, then the
# out-of-memory tests (tests/test_cuda_oom.py) without a sanitizer (memcheck itself reports the failed cudaMalloc
# as an API error).
# Writes $OUT/gpu_sanitize/{memcheck,racecheck,oom}.log and summary.json; exits non-zero on any sanitizer error,
# test failure or timeout. Budget < 3 min: each step has its own timeout (MEMCHECK_S, RACECHECK_S, OOM_S).
# Usage: OUT=/some/dir bash bench/gpu_sanitize.sh     (PYTHON=... to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${OUT:-out}/gpu_sanitize"
mkdir -p "$DIR"
PY="${PYTHON:-python}"
MEMCHECK_S="${MEMCHECK_S:-75}" RACECHECK_S="${RACECHECK_S:-75}" OOM_S="${OOM_S:-25}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MOLM_REQUIRE_EXTENSION=1
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -m cuda tests)
# SANITIZE_CASES: a pytest -k expression choosing the tests to run under the sanitizers (all CUDA tests by default;
# gpu_check.sh picks one case per kernel family so the pass fits its time limit)
if [ -n "${SANITIZE_CASES:-}" ]; then PYTEST+=(-k "$SANITIZE_CASES"); fi

summary() {  # summary.json from the step results collected in $DIR/*.rc
  "$PY" - "$DIR" "$@" <<'PY'
import json, os, re, sys
directory, extra = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
steps, ok = {}, True
for step in ("memcheck", "racecheck", "oom"):
    rc_file, log_file = os.path.join(directory, f"{step}.rc"), os.path.join(directory, f"{step}.log")
    if not os.path.exists(rc_file):
        continue
    rc, seconds = open(rc_file).read().split()
    log = open(log_file, errors="replace").read() if os.path.exists(log_file) else ""
    errors = sum(int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", log))
    outcome = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|error).*?) in [\d.]+s", log, re.M)
    steps[step] = {"exit_code": int(rc), "seconds": int(seconds), "sanitizer_errors": errors,
                   "timed_out": int(rc) in (124, 137), "pytest": outcome[-1] if outcome else None}
    ok = ok and int(rc) == 0 and errors == 0
summary = {"ok": ok, "steps": steps, **extra}
json.dump(summary, open(os.path.join(directory, "summary.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
sys.exit(0 if ok else 1)
PY
}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo '{"ok": true, "skipped": "no CUDA device"}' | tee "$DIR/summary.json"
  exit 0
fi
SAN="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}"
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
    "$("$PY" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)"/nvidia/*/bin/compute-sanitizer; do
  [ -z "$SAN" ] && [ -x "$candidate" ] && SAN="$candidate"
done
rm -f "$DIR"/*.rc
run_step() {  # name timeout command...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$DIR/$name.log" 2>&1
  echo "$? $((SECONDS - start))" >"$DIR/$name.rc"
  tail -n 3 "$DIR/$name.log"
}
if [ -n "$SAN" ]; then
  # --error-exitcode: any finding fails the step even when pytest itself passes
  for tool in memcheck racecheck; do
    limit=$MEMCHECK_S; [ $tool = racecheck ] && limit=$RACECHECK_S
    run_step $tool "$limit" "$SAN" --tool $tool --target-processes all --error-exitcode 99 --print-limit 50 \
      "${PYTEST[@]}" --ignore=tests/test_cuda_oom.py
  done
else
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER=...): sanitizer steps not run"
fi
run_step oom "$OOM_S" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_oom.py -rs
summary "compute_sanitizer=${SAN:-missing}" "gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
