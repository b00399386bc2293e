"""Where a MoLM decode step spends its GPU time: each kernel's calls, µs per call and share of the step.

MoLM-350M-4B widths, random bf16 weights, context 1024; for each batch size, eager decode steps
(`StaticDecoder(cuda_graphs=False)`) run under torch.profiler, and the same steps replayed from CUDA graphs are
timed beside them. The step's GPU time (kernels only) against the graph-replayed step says how much of the step is
the kernels; against the bytes a step must read (bench/e2e.py's count) and the HBM bandwidth, how far the kernels
are from the memory roofline. The per-kernel table says which kernel to work on next.

    python bench/gpu_bench_decode_profile.py [--quick] [--json PATH]
    python bench/gpu_bench_decode_profile.py --device cpu --smoke      # the code path on a tiny model (tests)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import RandomCacheDecoder, Timer, decode_bytes_per_step  # noqa: E402

from molm.config import PRESETS  # noqa: E402

from common import random_model, run_metadata  # noqa: E402

HBM_GBPS = 4300.0  # measured device copy bandwidth of an H200 (read + write)


def seconds_per_step(decoder: RandomCacheDecoder, steps: int, device: torch.device) -> float:
    with Timer(device) as t:
        for _ in range(steps):
            decoder.step()
    return t.seconds / steps


def kernel_table(prof, steps: int, device: torch.device) -> list[dict]:
    """Per kernel (GPU) or per top-level op (CPU): calls and µs per step, µs per call, longest first."""
    total, calls = collections.Counter(), collections.Counter()
    for event in prof.events():
        if device.type == "cuda":
            wanted = event.device_type == DeviceType.CUDA
        else:
            wanted = event.device_type == DeviceType.CPU and event.cpu_parent is None
        if not wanted:
            continue
        total[event.name] += event.time_range.elapsed_us()
        calls[event.name] += 1
    return [
        dict(name=name, calls_per_step=calls[name] / steps, us_per_step=us / steps, us_per_call=us / calls[name])
        for name, us in total.most_common()
    ]


def profile_batch(model, batch: int, context: int, steps: int) -> dict:
    device = model.device
    eager = RandomCacheDecoder(model, batch, context, 2 * steps + 12, graphs=False)
    for _ in range(3):  # warm-up
        eager.step()
    eager_s = seconds_per_step(eager, steps, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            eager.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    kernels = kernel_table(prof, steps, device)
    record = dict(
        batch=batch,
        context=context,
        eager_step_ms=eager_s * 1e3,
        kernel_ms_per_step=sum(k["us_per_step"] for k in kernels) / 1e3,
        bytes_per_step=decode_bytes_per_step(model.config, batch, context),
        kernels=kernels,
    )
    if device.type == "cuda":
        replayed = RandomCacheDecoder(model, batch, context, steps + 12, graphs=True)
        for _ in range(3):  # warm-up, captures the graph
            replayed.step()
        record["graph_step_ms"] = seconds_per_step(replayed, steps, device) * 1e3
        record["roofline_ms"] = record["bytes_per_step"] / (HBM_GBPS * 1e9) * 1e3
    return record


def print_record(r: dict, rows: int):
    line = f"== batch {r['batch']}, context {r['context']}: eager step {r['eager_step_ms']:.2f} ms"
    if "graph_step_ms" in r:
        line += (
            f", graph-replayed step {r['graph_step_ms']:.2f} ms, kernels {r['kernel_ms_per_step']:.2f} ms, "
            f"HBM roofline {r['roofline_ms']:.3f} ms"
        )
    print(line)
    total = r["kernel_ms_per_step"] * 1e3 or 1.0
    print(f"{'calls':>6} {'µs/call':>8} {'µs/step':>8} {'share':>6}  kernel")
    for k in r["kernels"][:rows]:
        name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
        share = 100 * k["us_per_step"] / total
        print(f"{k['calls_per_step']:6.0f} {k['us_per_call']:8.1f} {k['us_per_step']:8.1f} {share:5.1f}%  {name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8 only, fewer steps")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny config (to exercise the code, not to measure)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--rows", type=int, default=15, help="kernels printed per batch size")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench_decode_profile.py: no CUDA device (use --device cpu --smoke to exercise the code)")
    device = torch.device(args.device)
    config = PRESETS["MoLM-350M-4B"]()
    if args.smoke:
        config = config.replace(n_layer=2, n_embd=64, att_hidden=64, ffd_hidden=128, gating_size=32, vocab_size=512)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(config, dtype, str(device))
    batches = (1, 8) if args.quick or args.smoke else (1, 8, 64)
    context, steps = (32, 2) if args.smoke else (1024, 5 if args.quick else 10)
    meta = dict(run_metadata(), model="MoLM-350M-4B" + (" (smoke)" if args.smoke else ""), dtype=str(dtype))
    if device.type == "cuda":
        meta.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, hbm_gbps_assumed=HBM_GBPS)
    records = []
    with torch.inference_mode():
        for batch in batches:
            records.append(profile_batch(model, batch, context, steps))
            print_record(records[-1], args.rows)
            if args.json:  # after every batch size, so a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(dict(meta=meta, records=records), f, indent=1)


if __name__ == "__main__":
    main()
