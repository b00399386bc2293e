"""Load test of `molm serve`: aggregate tokens/s, request latency and time to first token vs concurrent clients.

    python bench/serve_load.py [--model DIR] [--clients 1 4 16 64] [--requests 4] [--max-tokens 32]

Starts `molm serve` in a subprocess on a free port (so the clients do not share its interpreter), then for each
client count runs that many threads, each sending --requests streaming greedy completions back to back with
--max-tokens tokens. Prints a table, writes bench/results/serve_load.json and, with matplotlib, a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from molm.plotting import pyplot

from common import run_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "To be, or not to be",
    "Now is the winter of our discontent",
    "O Romeo, Romeo",
    "Friends, Romans,",
    "All the world's a stage",
    "The quality of mercy",
    "Once more unto the breach",
    "If music be the food",
]


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; returns latency, time to first token and tokens generated."""
    start = time.perf_counter()
    first = None
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if first is None and chunk["choices"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client(c):
        return [one_request(url, PROMPTS[(c + r) % len(PROMPTS)], max_tokens) for r in range(requests)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    latency, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": sum(r["tokens"] for r in results),
        "seconds": wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "latency_p50": statistics.median(latency),
        "latency_p99": percentile(latency, 99),
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": percentile(ttft, 99),
    }


def plot(rows: list[dict], path: str) -> None:
    plt = pyplot("serve load plot")
    if plt is None:
        return
    clients = [r["clients"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(clients, [r["tokens_per_s"] for r in rows], "o-")
    ax1.set(xscale="log", xlabel="concurrent clients", ylabel="generated tokens / s", title="throughput")
    for key, label in (
        ("latency_p50", "latency p50"),
        ("latency_p99", "latency p99"),
        ("ttft_p50", "TTFT p50"),
        ("ttft_p99", "TTFT p99"),
    ):
        ax2.plot(clients, [r[key] for r in rows], "o-", label=label)
    ax2.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds", title="latency")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded small model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "serve_load.json"))
    args = parser.parse_args()

    command = [
        sys.executable,
        "-m",
        "molm.cli",
        "serve",
        "--port",
        "0",
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        "4096",
    ] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ROOT}
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stderr.readline()
        if "http://" not in line:
            raise RuntimeError(f"molm serve did not start: {line}{server.stderr.read()}")
        url = "http://" + line.split("http://")[1].split("/v1")[0]
        one_request(url, PROMPTS[0], 4)  # warm-up
        rows = []
        print(
            f"{'clients':>7} {'requests':>8} {'tok/s':>8} {'lat p50':>8} {'lat p99':>8} {'ttft p50':>9} {'ttft p99':>9}"
        )
        for clients in args.clients:
            row = run_level(url, clients, args.requests, args.max_tokens)
            rows.append(row)
            print(
                f"{clients:>7} {row['requests']:>8} {row['tokens_per_s']:>8.1f} {row['latency_p50']:>8.3f} "
                f"{row['latency_p99']:>8.3f} {row['ttft_p50']:>9.3f} {row['ttft_p99']:>9.3f}",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(60)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(
            {
                "meta": {
                    **run_metadata(),
                    "server_threads": args.threads,
                    "max_tokens": args.max_tokens,
                    "max_batch": args.max_batch,
                    "model": args.model or "molm/default_model",
                },
                "rows": rows,
            },
            f,
            indent=2,
        )
    plot(rows, os.path.splitext(args.json)[0] + ".png")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
