"""Timing and run metadata shared by the benchmarks in bench/."""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time

import torch

import molm


def median_seconds(fn, runs: int, warmup: int = 1) -> float:
    """Median wall time of `runs` calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_metadata() -> dict:
    """What a result needs to be compared later: torch, CPU, threads, git commit, date."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    return {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "git_sha": sha,
        "date": datetime.datetime.now().isoformat(),
    }


@torch.no_grad()
def random_model(config, dtype: torch.dtype, device: str = "cpu", backend: str = "extension", seed: int = 0):
    """A ModuleFormerForCausalLM with random weights built straight in `dtype` on `device` (never an fp32 copy:
    the full MoLM configs hold 4-8 B parameters). LayerNorms are identity, everything else normal(0, 0.02)."""
    with torch.device("meta"):
        model = molm.ModuleFormerForCausalLM(config, backend=backend)
    model.to(dtype).to_empty(device=device)  # dtype first: meta tensors cost nothing to convert
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
