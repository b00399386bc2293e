#!/usr/bin/env bash
# The one script for a GPU machine (run from the repo root; results under $OUT, default ./out/gpu):
#   env + card ceilings -> build (no build isolation) -> pytest -m cuda -> compute-sanitizer on one case per kernel
#   family -> bench/e2e.py -> every bench/gpu_bench_*.py.
# Correctness comes first, so a run cut short still says whether the kernels are right. Never stops at the first
# failure: each step is time-limited (the whole run stays under ~8 minutes, --quick under 4) and its exit status goes
# to summary.json; all output goes to gpu_check.log as well. A step over its limit gets SIGINT first, so pytest still
# writes its junit XML and the benchmarks (which write their JSON after every record) keep what they measured.
# The device tool brings back at most 8 files from $OUT, so every result is written to a work folder and $OUT
# receives summary.json, env.json, build.json, e2e.json, the expert-load PNG and results.tgz (everything).
# Missing Python packages travel as wheels in .gpu-wheels/ (made by bench/fetch_gpu_wheels.sh).
#
# Usage: bash bench/gpu_check.sh [--quick] [--no-bench] [--dry-run]
#   --quick    a subset of every step that fits in about 4 minutes (first contact with a new machine)
#   --no-bench the correctness steps only (build, CUDA tests, sanitizers): a check of a fix, when the benchmarks'
#              results are already in hand
#   --dry-run  runs only the env step and records every other step as planned (no GPU needed; CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0 DRY_RUN=0 NO_BENCH=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --no-bench) NO_BENCH=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (expected --quick, --no-bench or --dry-run)" >&2; exit 2 ;;
  esac
done
FINAL=${OUT:-out/gpu}
OUT=$(mktemp -d /tmp/molm-gpu-check.XXXX)  # children (bench, sanitizer) write here too
export OUT
mkdir -p "$FINAL"
PY=${PYTHON:-python3}
if ((QUICK)); then BUDGET=${GPU_CHECK_BUDGET_S:-230}; else BUDGET=${GPU_CHECK_BUDGET_S:-470}; fi
START=$SECONDS
LOG="$OUT/gpu_check.log"
: > "$LOG"
STEPS=()

# step NAME LIMIT_S CMD...: runs CMD with at most LIMIT_S seconds (less when the budget is nearly spent).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "=== $name: skipped (time budget spent)" | tee -a "$LOG"
    STEPS+=("{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": true}")
    return
  fi
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  if ((DRY_RUN)) && [ "$name" != env ]; then
    STEPS+=("{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"limit\": $limit, \"dry_run\": true}")
    return
  fi
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
}

# Pinned, not inherited: an H200 runs sm_90a code, and only a 9.0a target builds the CUTLASS grouped GEMM (with
# 9.0 it would be left out; see setup.py). env.json and build.json record what was used.
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0a
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi  # else torch finds nvcc on PATH

if compgen -G ".gpu-wheels/*.whl" > /dev/null; then
  step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/molm-site .gpu-wheels/*.whl
  export PYTHONPATH=/tmp/molm-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step env 90 "$PY" - "$OUT/env.json" <<'PYEOF'
import json, os, subprocess, sys, time
import torch

def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        return f"unavailable: {exc}"

env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.version.split()[0],
       "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
       "nvcc": sh(["bash", "-c", "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc --version | tail -2"]),
       "nvidia_smi": sh(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                         "clocks.max.mem,power.draw,power.limit,temperature.gpu,memory.total", "--format=csv"])}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
               memory_gib=round(p.total_memory / 2**30, 1))
    def timed(fn, reps):
        fn(); torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record(); b.synchronize()
        return a.elapsed_time(b) / 1e3 / reps
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    env["copy_gbps"] = round(2 * src.numel() / timed(lambda: dst.copy_(src), 20) / 1e9, 1)  # read + write
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    env["bf16_matmul_tflops"] = round(2 * 8192**3 / timed(lambda: a @ b, 10) / 1e12, 1)
    env["nvidia_smi_after"] = sh(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem", "--format=csv"])
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env, indent=1))
PYEOF

step build 200 "$PY" setup.py build_ext --inplace
step check_registered 60 "$PY" -c "
import json, torch, molm._C
names = ['route_topk', 'gather_rows', 'scatter_ksum', 'expert_gemm', 'expert_gemm_wgrad', 'sb_attention',
         'sb_attention_backward', 'linear', 'expert_gemm_q8', 'linear_q8', 'moe_map', 'moe_reduce', 'moe_mlp']
missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key('molm::' + n, 'CUDA')]
print('CUDA kernels missing for:', missing or 'none')
info = molm._C.build_info()
json.dump(info, open('$OUT/build.json', 'w'))
print('build info:', info)
assert info['cutlass_sm90a'], 'the CUTLASS sm_90a GEMM was not built'"
# one case per kernel family (the MoE layer forward and backward, attention forward and backward, the CUTLASS GEMM)
# for the sanitizer, and for the quick run's tests
FAMILY_CASES="test_moe_layer_bitwise_repeatable_and_vs_reference or test_grad_layer_vs_reference or \
test_cuda_matches_cpu_and_is_bitwise_repeatable or test_cuda_backward_matches_cpu_op or \
test_expert_gemm_sm90_on_and_off_agree or test_gather_rows_gradient_is_bitwise_repeatable or graph_capture"
# through pytest_resume.sh: a test that kills the process is reported and the tests after it still run
PYTEST=(env LOG_PREFIX="$OUT/pytest_cuda" bash bench/pytest_resume.sh "$PY" -m pytest -m cuda tests/ -rfE
  -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml")
if ((QUICK)); then
  step pytest_cuda 60 "${PYTEST[@]}" -k "$FAMILY_CASES"
  step gpu_sanitize 50 env MEMCHECK_S=20 RACECHECK_S=20 OOM_S=8 SANITIZE_CASES="$FAMILY_CASES" bash bench/gpu_sanitize.sh
else
  step pytest_cuda 120 "${PYTEST[@]}"
  step gpu_sanitize 150 env MEMCHECK_S=45 RACECHECK_S=90 OOM_S=15 SANITIZE_CASES="$FAMILY_CASES" bash bench/gpu_sanitize.sh
fi
if ((!NO_BENCH)); then
  if ((QUICK)); then
    step e2e 50 "$PY" bench/e2e.py --models MoLM-350M-4B --impls extension reference --batches 1 8 --contexts 1024 \
      --json "$OUT/e2e.json" --png "$OUT/e2e_expert_load.png"
  else
    step e2e 150 "$PY" bench/e2e.py --json "$OUT/e2e.json" --png "$OUT/e2e_expert_load.png"
  fi
  for bench in bench/gpu_bench_*.py; do  # per-kernel benchmarks; each writes its JSON as it goes
    [ -e "$bench" ] || continue
    name=$(basename "$bench" .py)
    if ((QUICK)); then
      step "$name" 30 "$PY" "$bench" --quick --json "$OUT/$name.json"
    else
      step "$name" 90 "$PY" "$bench" --json "$OUT/$name.json"
    fi
  done
fi

{
  echo "{\"total_seconds\": $((SECONDS - START)), \"quick\": $QUICK, \"no_bench\": $NO_BENCH, \"dry_run\": $DRY_RUN, \"budget_s\": $BUDGET, \"steps\": ["
  for i in "${!STEPS[@]}"; do
    [ "$i" -gt 0 ] && echo ","
    echo "  ${STEPS[$i]}"
  done
  echo "]}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
tar czf "$FINAL/results.tgz" -C "$OUT" .
for f in summary.json env.json build.json e2e.json e2e_expert_load.png; do
  [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL/"
done
echo "results in $FINAL: $(ls "$FINAL" | tr '\n' ' ')"
