"""CPU decode and prefill throughput of both backends on a random model with MoLM-350M-4B widths.

    python bench/cpu_generate.py --layers 4 --json bench/results/cpu_generate.json

Prints one row per (dtype, batch, backend): prefill tok/s, decode tok/s, and the extension/reference speedup.
Decode is timed as molm.generate_ids runs it (greedy, one token per sequence per step, with the KV cache) after a
prefill of --prompt tokens.

    python bench/cpu_generate.py --contention --builds old=../molm-old new=. --json bench/results/x.json

Busy-machine mode (extension backend, batch 1): decode tok/s of each molm checkout (its built extension) at the
default torch thread count and at 1 thread, with one competing CPU-bound process running and without, the same
for molm's expert GEMM alone (decode-shaped), then the checkout(s) that have molm.ops.set_cpu_isa at every
instruction set the CPU supports (1 thread). Each checkout runs in its own subprocess, once per OpenMP wait policy
(--omp-wait-policies: PASSIVE, what the molm command gets, and libgomp's default); settings alternate within a
repeat and the medians over --repeats are reported, with the load average.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import molm
from molm.config import PRESETS

from common import median_seconds, peak_rss_gb, random_model, run_metadata


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def decode_bytes_per_step(model, context: int) -> int:
    """Bytes a batch-1 decode step must read at least: lm_head, routers, norms, the k chosen experts of every MoE
    site (int8 ones with their scales) and the KV cache (once per layer when K = V), in their stored dtypes."""
    c = model.config
    act = model.transformer.wte.weight.element_size()
    total = 0
    for block in model.transformer.h:
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            if "experts" not in name:
                total += _bytes(t)
        for moe, k in ((block.attn.q_proj, c.k_att), (block.mlpf, c.k_mlp)):
            for experts in (moe.experts, moe.output_experts):
                per_expert = sum(_bytes(t) for t in experts.state_dict().values()) // experts.weight.shape[0]
                total += k * per_expert
        total += context * c.att_hidden * act * (1 if c.identity_kv else 2)
    head = sum(_bytes(t) for t in model.lm_head.state_dict().values())
    return total + head + _bytes(model.transformer.ln_f.weight) * 2


def read_bandwidth_gbs() -> float:
    """Streaming-read bandwidth of this machine with the current torch threads: a sum over 1 GiB of fp32."""
    x = torch.ones(2**28)
    seconds = median_seconds(lambda: x.sum(), runs=5)
    return x.numel() * 4 / seconds / 1e9


def generation_seconds(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds of `steps` greedy decode steps of molm.generate_ids (what molm.generate and the CLI run), after its
    prefill and first token (untimed)."""
    tokens = molm.generate_ids(model, ids, max_new_tokens=steps + 1)
    next(tokens)
    start = time.perf_counter()
    for _ in tokens:
        pass
    return time.perf_counter() - start


def decode_rate(model, batch: int, prompt: int, steps: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    generation_seconds(model, ids, steps)  # warm-up
    seconds = statistics.median(generation_seconds(model, ids, steps) for _ in range(2))
    return batch * steps / seconds


def prefill_rate(model, batch: int, length: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    seconds = median_seconds(lambda: model(ids, return_aux_loss=False, logits_to_keep=1), runs=2)
    return batch * length / seconds


def decode_once(model, prompt: int, steps: int) -> float:
    """Batch-1 decode tok/s of one generation of `steps` tokens after an (untimed) prefill of `prompt` tokens."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    return steps / generation_seconds(model, ids, steps)


def expert_gemm_once(model, calls: int = 20) -> float:
    """Calls/s of molm's expert GEMM on a decode-shaped input: one token routed to 2 experts of the first MLP."""
    weight = next(p for n, p in model.named_parameters() if "mlp" in n and n.endswith("experts.weight"))  # [E, C, F]
    x = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(2)).to(weight.dtype)
    offsets = torch.tensor([0, 1, 2] + [2] * (weight.shape[0] - 2))
    start = time.perf_counter()
    for _ in range(calls):
        molm.ops.expert_gemm(x, weight, offsets, "gelu_new")
    return calls / (time.perf_counter() - start)


def contention_worker(spec: dict) -> None:
    """Runs in the subprocess of one checkout: decode tok/s per (threads, isa) condition, `repeats` rounds, the
    conditions of a round in rotating order. Prints one JSON object."""
    from molm import ops

    has_isa = hasattr(ops, "set_cpu_isa")
    config = PRESETS["MoLM-350M-4B"]().replace(n_layer=spec["layers"])
    model = random_model(config, getattr(torch, spec["dtype"]), "cpu", backend="extension", seed=0)
    default_threads = torch.get_num_threads()
    conditions = [(t, isa) for t in spec["threads"] for isa in (spec["isas"] if has_isa else [None])]
    conditions = [(t, isa) for t, isa in conditions if isa is None or isa in ops.cpu_isas()]
    samples = {c: [] for c in conditions}
    with torch.inference_mode():
        decode_once(model, spec["prompt"], 4)  # warm-up
        for rep in range(spec["repeats"]):
            for i in range(len(conditions)):
                threads, isa = conditions[(i + rep) % len(conditions)]
                torch.set_num_threads(default_threads if threads == "default" else threads)
                if isa is not None:
                    ops.set_cpu_isa(isa)
                measure = (
                    expert_gemm_once(model)
                    if spec["measure"] == "expert_gemm"
                    else decode_once(model, spec["prompt"], spec["steps"])
                )
                samples[(threads, isa)].append(measure)
    print(
        json.dumps(
            {
                "default_threads": default_threads,
                "molm_file": molm.__file__,
                "default_isa": ops.cpu_isa() if has_isa else None,
                "results": [{"threads": t, "isa": isa, "samples": samples[(t, isa)]} for t, isa in conditions],
            }
        )
    )


def run_checkout(path: str, spec: dict, omp_wait_policy: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
    env.pop("OMP_NUM_THREADS", None)  # the default thread count is one of the settings compared
    env.pop("OMP_WAIT_POLICY", None)  # "default": libgomp's own (a program that imports torch before molm)
    if omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker for {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def git_commit(path: str) -> str:
    run = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return run.stdout.strip() or "?"


def contention_main(args) -> None:
    builds = dict(b.split("=", 1) for b in args.builds) or {"this": os.path.dirname(os.path.dirname(__file__))}
    float_dtypes = [d for d in args.dtypes if d != "int8"]  # older checkouts have no int8
    records = []
    print(
        f"batch-1 decode, MoLM-350M-4B widths, {args.layers} layers, prompt {args.prompt}, {args.steps} steps, "
        f"median of {args.repeats}; {os.cpu_count()} CPUs"
    )
    print(
        f"{'phase':>13} {'checkout':>16} {'dtype':>9} {'threads':>8} {'isa':>12} {'median':>9}  samples "
        "(decode: tok/s; op: expert_gemm calls/s)"
    )
    all_isas = ["scalar", "avx2", "avx512", "avx512_bf16"]
    phases = {  # name: (competing process, thread settings, isas (None: the checkout's default), measure)
        "competitor": (True, ["default", 1], [None], "decode"),
        "quiet": (False, ["default", 1], [None], "decode"),
        "op_competitor": (True, ["default", 1], [None], "expert_gemm"),
        "isa": (False, [1], all_isas, "decode"),
        "op_isa": (False, [1], all_isas, "expert_gemm"),
    }
    for phase in args.phases:
        compete, threads, isas, measure = phases[phase]
        for dtype in float_dtypes if "isa" in phase else float_dtypes[:1]:
            for (build, path), policy in itertools.product(builds.items(), args.omp_wait_policies):
                if "isa" in phase and "def set_cpu_isa" not in open(os.path.join(path, "molm", "ops.py")).read():
                    continue  # a checkout without the switch has nothing to report here
                name = build if len(args.omp_wait_policies) == 1 else f"{build}/{policy.lower()}"
                spec = {
                    "layers": args.layers,
                    "dtype": dtype,
                    "prompt": args.prompt,
                    "steps": args.steps,
                    "repeats": args.repeats,
                    "threads": threads,
                    "measure": measure,
                    "isas": [i for i in isas if i is not None] or [None],
                }
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if compete else None
                try:
                    load_before = os.getloadavg()
                    out = run_checkout(path, spec, policy)
                    load_after = os.getloadavg()
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                for r in out["results"]:
                    med = statistics.median(r["samples"])
                    print(
                        f"{phase:>13} {name:>16} {dtype:>9} {str(r['threads']):>8} {str(r['isa'] or '-'):>12} "
                        f"{med:>9.2f}  {' '.join(f'{v:.1f}' for v in r['samples'])}"
                    )
                    records.append(
                        {
                            "phase": phase,
                            "competing_busy_process": compete,
                            "checkout": build,
                            "omp_wait_policy": policy,
                            "dtype": dtype,
                            "threads": r["threads"],
                            "default_threads": out["default_threads"],
                            "isa": r["isa"] or out["default_isa"],
                            "measure": measure,
                            "unit": "tok/s" if measure == "decode" else "calls/s",
                            "median": med,
                            "samples": r["samples"],
                            "loadavg_1m_before": load_before[0],
                            "loadavg_1m_after": load_after[0],
                        }
                    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "meta": dict(
                        run_metadata(),
                        layers=args.layers,
                        prompt=args.prompt,
                        steps=args.steps,
                        repeats=args.repeats,
                        checkouts={name: git_commit(path) for name, path in builds.items()},
                    ),
                    "records": records,
                },
                f,
                indent=2,
            )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return contention_worker(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="layers of the MoLM-350M-4B config to keep (24 = full)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "bfloat16", "int8"],
        help="float32, bfloat16, or int8 (bf16 with int8 experts and lm_head)",
    )
    parser.add_argument("--prompt", type=int, default=128, help="prompt length before decoding")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--prefill", type=int, default=256, help="prefill length per sequence")
    parser.add_argument("--backends", nargs="+", default=["reference", "extension"])
    parser.add_argument("--json", default=None, help="write the records to this path")
    parser.add_argument("--contention", action="store_true", help="busy-machine mode (see above)")
    parser.add_argument(
        "--builds",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="molm checkouts (with a built extension) to compare in --contention mode (default: this)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds per setting in --contention mode")
    parser.add_argument(
        "--omp-wait-policies",
        nargs="+",
        default=["PASSIVE", "default"],
        help="OpenMP wait policies to run each checkout under in --contention mode: PASSIVE is what the molm command "
        "and server get (molm imported before torch), default is libgomp's (a program that imports torch first)",
    )
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["competitor", "quiet", "op_competitor", "isa", "op_isa"],
        help="--contention phases to run",
    )
    args = parser.parse_args()
    if args.contention:
        return contention_main(args)

    config = PRESETS["MoLM-350M-4B"]().replace(n_layer=args.layers)
    records = []
    print(f"MoLM-350M-4B widths, {args.layers} layers, torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = (
        f"{'dtype':>9} {'batch':>5} {'backend':>10} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode x':>9} "
        f"{'decode GB/s':>12} {'%read':>7} {'peak RSS GB':>12}"
    )
    print(header)
    print("-" * len(header))
    bandwidth = read_bandwidth_gbs()
    print(f"streaming read: {bandwidth:.1f} GB/s")
    for dtype_name in args.dtypes:
        # built straight in the dtype: the full 24-layer model is 4 B parameters (16 GB in fp32, 8 GB in bf16);
        # int8: the bf16 model with its experts and lm_head quantized (molm.quantize)
        dtype = torch.bfloat16 if dtype_name == "int8" else getattr(torch, dtype_name)
        model = random_model(config, dtype, "cpu", backend="reference", seed=0)
        if dtype_name == "int8":
            molm.quantize(model)
        for batch in args.batches:
            rates = {}
            for backend in args.backends:
                try:
                    model.set_backend(backend)
                except RuntimeError as exc:
                    print(f"{dtype_name:>9} {batch:>5} {backend:>10}  unavailable: {exc}")
                    continue
                with torch.inference_mode():
                    prefill = prefill_rate(model, batch, args.prefill)
                    decode = decode_rate(model, batch, args.prompt, args.steps)
                rates[backend] = decode
                speedup = decode / rates["reference"] if "reference" in rates else float("nan")
                # weight bytes are shared by the batch only when rows pick the same experts: report batch 1 only
                gbs = (
                    decode_bytes_per_step(model, args.prompt + args.steps // 2) * decode / 1e9
                    if batch == 1
                    else float("nan")
                )
                rss = peak_rss_gb()
                print(
                    f"{dtype_name:>9} {batch:>5} {backend:>10} {prefill:>14.1f} {decode:>13.2f} {speedup:>8.2f}x "
                    f"{gbs:>12.2f} {100 * gbs / bandwidth:>6.0f}% {rss:>12.1f}"
                )
                records.append(
                    {
                        "dtype": dtype_name,
                        "batch": batch,
                        "backend": backend,
                        "layers": args.layers,
                        "prompt": args.prompt,
                        "prefill_len": args.prefill,
                        "prefill_tok_s": prefill,
                        "decode_tok_s": decode,
                        "decode_speedup_vs_reference": speedup,
                        "decode_GB_s_batch1": None if batch != 1 else gbs,
                        "decode_pct_of_read_bandwidth": None if batch != 1 else 100 * gbs / bandwidth,
                        "peak_rss_GB": rss,
                    }
                )
        del model
    if args.json:
        meta = {**run_metadata(), "read_bandwidth_GB_s": bandwidth, "threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=2)


if __name__ == "__main__":
    main()
