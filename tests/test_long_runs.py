"""Long runs: 10,000 generated tokens with flat memory, 1,000 generate calls without a leak, and Ctrl-C during
`molm generate` printing what was produced and exiting 130.

RSS is the resident set from /proc/self/statm (Linux). The KV cache is preallocated for prompt + max_new_tokens,
so after the first samples nothing should grow at all; the allowance covers allocator noise only. Run with `-s` to
see the RSS figures.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import molm

DATA = os.path.join(os.path.dirname(__file__), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20
NOISE = 8 * MiB  # glibc arenas, torch's small-block reuse: anything above this is a leak

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS sampling needs Linux /proc")


def rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def tiny():
    """molm-tiny-a's widths with one layer and no eos (so generation never stops early), fp32."""
    config = molm.load(os.path.join(DATA, "molm-tiny-a"), backend="reference").config
    model = molm.ModuleFormerForCausalLM(config.replace(n_layer=1, eos_token_id=None)).init_weights(seed=0).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-step overhead dominates at this size; one thread keeps the run short and steady
    yield model
    torch.set_num_threads(threads)


def test_10k_tokens_memory_is_flat(tiny):
    n_new, prompt = 10_000, torch.tensor([[1, 2, 3, 4]])
    cache = molm.KVCache.for_model(tiny, 1, prompt.shape[1] + n_new)
    cache_bytes = sum(t.numel() * t.element_size() for t in cache.keys + (cache.values or []))
    del cache
    molm.generate(tiny, prompt, max_new_tokens=16)  # warm-up: one-time allocations (thread pools, workspaces)
    start = rss_bytes()
    samples, tokens = [], []
    for i, next_ids in enumerate(molm.generate(tiny, prompt, max_new_tokens=n_new, stream=True), 1):
        tokens.append(int(next_ids))
        if i % 1000 == 0:
            samples.append(rss_bytes())
    figures = ", ".join(f"{(s - start) / MiB:+.1f}" for s in samples)
    print(
        f"\n10k tokens: RSS {start / MiB:.1f} MiB at start, then every 1,000 tokens (MiB vs start): {figures}; "
        f"KV cache {cache_bytes / MiB:.2f} MiB"
    )
    assert len(tokens) == n_new and all(0 <= t < tiny.config.vocab_size for t in tokens)
    assert max(samples) - start <= cache_bytes + NOISE, f"RSS grew beyond the KV cache: {figures}"
    assert samples[-1] - samples[0] <= NOISE, f"RSS kept growing after the first 1,000 tokens: {figures}"


def test_1000_generate_calls_do_not_leak(tiny):
    prompt = torch.tensor([[5, 6, 7]])

    def call(i):
        molm.generate(tiny, prompt, max_new_tokens=2, temperature=0.7, seed=i)

    for i in range(100):  # warm-up: allocator pools and lazy initialisation settle
        call(i)
    samples = [rss_bytes()]
    for i in range(1000):
        call(i)
        if (i + 1) % 250 == 0:
            samples.append(rss_bytes())
    figures = ", ".join(f"{(s - samples[0]) / MiB:+.2f}" for s in samples[1:])
    print(f"\n1,000 generate calls: RSS {samples[0] / MiB:.1f} MiB after warm-up, every 250 calls (MiB): {figures}")
    assert max(samples) - samples[0] <= NOISE, f"RSS grew over 1,000 calls: {figures}"


class _Reader(threading.Thread):
    """Collects a pipe's bytes as they arrive."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.data = pipe, b""

    def run(self):
        while chunk := os.read(self.pipe.fileno(), 4096):
            self.data += chunk


def test_ctrl_c_prints_what_was_produced_and_exits_130():
    model_dir, prompt = os.path.join(DATA, "molm-tiny-a"), "It was the"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "molm.cli",
            "generate",
            "--model",
            model_dir,
            prompt,
            "--max-new-tokens",
            "100000",
            "--dtype",
            "float32",
            "--greedy",  # with no penalty: what molm.generate does by default
            "--repetition-penalty",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
    )
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    out.start(), err.start()
    deadline = time.monotonic() + 120
    while (
        len(out.data.decode(errors="ignore")) < len(prompt) + 30 and proc.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert proc.poll() is None, f"molm generate ended early: {err.data.decode()[-500:]}"
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    out.join(10), err.join(10)
    text = out.data.decode()
    assert rc == 130, f"exit {rc}: {err.data.decode()[-500:]}"
    assert "Traceback" not in err.data.decode()
    assert text.startswith(prompt) and text.endswith("\n")
    produced = text[len(prompt) : -1]
    assert len(produced) >= 30
    # what was printed is exactly the start of the same greedy generation run to completion
    model = molm.load(model_dir, dtype=torch.float32)
    n_tokens = len(molm.load_tokenizer(model_dir).encode(produced).ids) + 8
    assert molm.generate(model, prompt, max_new_tokens=n_tokens).startswith(produced)
