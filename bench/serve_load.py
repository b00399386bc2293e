"""Load test of `molm serve`: aggregate tokens/s, request latency and time to first token vs concurrent clients.

    python bench/serve_load.py [--model DIR] [--clients 1 4 16 64] [--requests 4] [--max-tokens 32] [--runs 3]

Starts `molm serve` in a subprocess on a free port (so the clients do not share its interpreter), then for each
client count runs that many threads, each sending --requests streaming greedy completions back to back with
--max-tokens tokens over one kept-alive connection. The sweep is repeated --runs times; each figure reported is
the median over the runs (the machine's load average is recorded before and after). Prints a table per run and of
the medians, writes bench/results/serve_load.json and, with matplotlib, a PNG next to it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

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


def one_request(connection: "Connection", prompt: str, max_tokens: int) -> dict:
    """Stream one completion over a kept-alive connection; returns latency, time to first token and tokens
    generated. The client is the standard library's, whose CPU cost per chunk is small next to the server's
    (the clients share the machine with the server they measure)."""
    start = time.perf_counter()
    first = None
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    tokens = 0
    for line in response:  # server-sent events, one per line
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[len("data: ") :])
        if first is None and chunk["choices"]:
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


class Connection(http.client.HTTPConnection):
    """http.client sends a request's headers and body in two writes: without TCP_NODELAY, on a kept-alive
    connection the body waits for the server's delayed ACK of the headers (40 ms on Linux)."""

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(url: str) -> Connection:
    address = urllib.parse.urlsplit(url)
    return Connection(address.hostname, address.port, timeout=600)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client(c):
        connection = connect(url)
        try:
            return [one_request(connection, PROMPTS[(c + r) % len(PROMPTS)], max_tokens) for r in range(requests)]
        finally:
            connection.close()

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


def print_header() -> None:
    print(f"{'clients':>7} {'requests':>8} {'tok/s':>8} {'lat p50':>8} {'lat p99':>8} {'ttft p50':>9} {'ttft p99':>9}")


def print_row(row: dict) -> None:
    print(
        f"{row['clients']:>7} {row['requests']:>8} {row['tokens_per_s']:>8.1f} {row['latency_p50']:>8.3f} "
        f"{row['latency_p99']:>8.3f} {row['ttft_p50']:>9.3f} {row['ttft_p99']:>9.3f}",
        flush=True,
    )


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
    parser.add_argument("--prefill-tokens", type=int, default=None, help="the server's --prefill-tokens")
    parser.add_argument("--runs", type=int, default=3, help="sweeps; figures are medians over them")
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
    if args.prefill_tokens is not None:
        command += ["--prefill-tokens", str(args.prefill_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ROOT}
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stderr.readline()
        if "http://" not in line:
            raise RuntimeError(f"molm serve did not start: {line}{server.stderr.read()}")
        url = "http://" + line.split("http://")[1].split("/v1")[0]
        one_request(connect(url), PROMPTS[0], 4)  # warm-up
        load_before, runs = os.getloadavg(), []
        for run in range(args.runs):
            print(f"run {run + 1} of {args.runs}")
            print_header()
            runs.append([])
            for clients in args.clients:
                runs[-1].append(run_level(url, clients, args.requests, args.max_tokens))
                print_row(runs[-1][-1])
        load_after = os.getloadavg()
    finally:
        server.terminate()
        server.wait(60)
    # per client count, each measured figure's median over the runs (the counts are the same in every run)
    rows = [
        {key: n if isinstance(n, int) else statistics.median(run[i][key] for run in runs) for key, n in level.items()}
        for i, level in enumerate(runs[0])
    ]
    print(f"median of {args.runs} runs (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)")
    print_header()
    for row in rows:
        print_row(row)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(
            {
                "meta": {
                    **run_metadata(),
                    "server_threads": args.threads,
                    "max_tokens": args.max_tokens,
                    "max_batch": args.max_batch,
                    "prefill_tokens": args.prefill_tokens,
                    "runs": args.runs,
                    "load_average_before": load_before,
                    "load_average_after": load_after,
                    "model": args.model or "molm/default_model",
                },
                "rows": rows,
                "runs": runs,
            },
            f,
            indent=2,
        )
    plot(rows, os.path.splitext(args.json)[0] + ".png")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
