"""Timing and run metadata shared by the benchmarks in bench/."""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time

import torch


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
    return {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "git_sha": sha, "date": datetime.datetime.now().isoformat()}
