"""GPU benchmark of molm's CUDA stick-breaking attention against the pure-torch reference path (MoLM shapes).

One head of D = 1024, k = 2 query slots per token, K = V (one cache tensor), bf16:
  prefill B x T = 32 x 2048 and 8 x 8192 (T = S): useful TFLOP/s (4 k D per causal query-key pair),
      special-function rate (3 exp/log per pair), speedup over `sb_attention_ref`, for the fused tensor-core path
      (with and without its early exit, and in a long-range regime where the exit helps less) and the cuBLAS-tiled
      path; backward at 8 x 2048 (fused and tiled). With the early exit, TFLOP/s and Gspec/s are effective rates:
      they count every causal pair, walked or skipped.
  decode T = 1, B = 1, 8, 64 at S = 1k, 4k, 16k: GB/s of K/V read (each cached token once) and % of 4.3 TB/s.
Times are medians of CUDA-event timings after warm-up; decode rotates several caches so that they exceed L2.
Max error is against the fp32 reference on the first batch element (shapes too large for fp32 at full batch).
Prints a table; `--json PATH` writes flat records.

    python bench/gpu_bench_attention.py [--quick] [--runs 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess

import torch

from molm import ops, reference

D, K_SLOTS, HBM_GBPS = 1024, 2, 4300.0
SPECIAL_PER_PAIR = 3  # exp(-|l|), log1p, exp(running sum)


def _median_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _rotating(fn_of_set, n_sets: int):
    """A callable that runs fn_of_set(i) for i = 0, 1, ... n_sets-1 in turn (defeats L2 reuse between runs)."""
    state = {"i": 0}

    def run():
        out = fn_of_set(state["i"] % n_sets)
        state["i"] += 1
        return out

    return run


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1.0)).item()


def _causal_pairs(t: int, s: int) -> int:
    return t * s - t * (t - 1) // 2


# Prefill and backward paths (molm.ops.set_kernel_options, read by the extension on every call).
PATHS = {
    "fused": dict(sb_fused=True, sb_fused_backward=True, sb_early_exit=True),
    "fused, no early exit": dict(sb_fused=True, sb_fused_backward=True, sb_early_exit=False),
    "tiled (cuBLAS)": dict(sb_fused=False, sb_fused_backward=False, sb_early_exit=True),
}


def _use_path(name: str) -> None:
    ops.set_kernel_options(**PATHS[name])


def prefill_cases(quick: bool, runs: int, gen: torch.Generator):
    """Random bf16 inputs give logits ~ N(0, 1), so beta ~ 0.5 and the stick is used up within ~64 keys: the early
    exit then skips almost every key tile. The "long range" regime adds a bias of -4 to every logit (beta ~ 0.02,
    ~1500 keys to use up the stick), closer to a model that attends far back; "no early exit" is the worst case."""
    shapes = [(32, 2048), (8, 8192)] if not quick else [(8, 2048)]
    for B, T in shapes:
        q = torch.randn(B, T, K_SLOTS, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(B, T, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16)
        scale = D**-0.5
        try:
            ms_ref = _median_ms(lambda: reference.sb_attention_ref(q, kv, kv, None, scale), max(3, runs // 4), warmup=1)
        except torch.OutOfMemoryError:
            ms_ref = float("nan")
        torch.cuda.empty_cache()
        pairs = B * K_SLOTS * _causal_pairs(T, T)
        for regime, shift in (("random logits", None), ("long range", -4.0)):
            bias = None if shift is None else torch.full((B, T), shift, device="cuda")
            ref32 = reference.sb_attention_ref(
                q[:1].float(), kv[:1].float(), kv[:1].float(), None if bias is None else bias[:1], scale
            )
            for path in PATHS if shift is None else ("fused", "fused, no early exit"):
                _use_path(path)
                fn = lambda: ops.sb_attention(q, kv, kv, bias, scale)  # noqa: E731
                out = fn()
                err, bitwise = _max_err(out[:1], ref32), torch.equal(out, fn())
                del out
                ms = _median_ms(fn, runs)
                yield dict(
                    kind="prefill",
                    case=f"B={B} T=S={T} k={K_SLOTS} D={D} bf16",
                    path=path,
                    regime=regime,
                    ms=ms,
                    ref_ms=ms_ref,
                    speedup=ms_ref / ms,
                    tflops=4 * pairs * D / ms / 1e9,
                    gspecial_per_s=SPECIAL_PER_PAIR * pairs / ms / 1e6,
                    gbps=None,
                    pct_hbm=None,
                    max_err=err,
                    bitwise_repeat=bitwise,
                )
                torch.cuda.empty_cache()
    _use_path("fused")
    # backward at one training shape: fused op vs autograd of the reference
    B, T = (8, 2048) if not quick else (2, 1024)
    q = torch.randn(B, T, K_SLOTS, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(B, T, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(q.shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    scale = D**-0.5

    def fused():
        dq, dk, dv, _ = torch.ops.molm.sb_attention_backward(grad, q, kv, kv, None, scale, False)
        return dq, dk + dv

    def ref_autograd():
        qr, kvr = q.detach().requires_grad_(), kv.detach().requires_grad_()
        return torch.autograd.grad(reference.sb_attention_ref(qr, kvr, kvr, None, scale), (qr, kvr), grad)

    q32, kv32 = q[:1].float().requires_grad_(), kv[:1].float().requires_grad_()
    want = torch.autograd.grad(reference.sb_attention_ref(q32, kv32, kv32, None, scale), (q32, kv32), grad[:1].float())
    ms_ref = _median_ms(ref_autograd, max(3, runs // 4), warmup=1)
    pairs = B * K_SLOTS * _causal_pairs(T, T)
    for path in ("fused", "tiled (cuBLAS)"):
        _use_path(path)
        got = fused()
        err = max(_max_err(got[0][:1], want[0]), _max_err(got[1][:1], want[1]))
        bitwise = all(torch.equal(a, b) for a, b in zip(got, fused()))
        del got
        ms = _median_ms(fused, runs)
        yield dict(
            kind="backward",
            case=f"B={B} T=S={T} k={K_SLOTS} D={D} bf16",
            path=path,
            regime="random logits",
            ms=ms,
            ref_ms=ms_ref,
            speedup=ms_ref / ms,
            tflops=10 * pairs * D / ms / 1e9,
            gspecial_per_s=2 * SPECIAL_PER_PAIR * pairs / ms / 1e6,
            gbps=None,
            pct_hbm=None,
            max_err=err,
            bitwise_repeat=bitwise,
        )
    _use_path("fused")


def decode_cases(quick: bool, runs: int, gen: torch.Generator):
    batches = (1, 8, 64) if not quick else (1, 64)
    lengths = (1024, 4096, 16384) if not quick else (4096,)
    for B in batches:
        for S in lengths:
            cache_bytes = B * S * D * 2
            n_sets = max(1, min(8, (400 << 20) // cache_bytes))  # > 400 MB in rotation (several times L2)
            caches = [
                torch.randn(B, S, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(n_sets)
            ]
            qs = [
                torch.randn(B, 1, K_SLOTS, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16)
                for _ in range(n_sets)
            ]
            scale = D**-0.5
            fn = _rotating(lambda i, qs=qs, cs=caches: ops.sb_attention(qs[i], cs[i], cs[i], None, scale), n_sets)
            fn_ref = _rotating(
                lambda i, qs=qs, cs=caches: reference.sb_attention_ref(qs[i], cs[i], cs[i], None, scale), n_sets
            )
            out = ops.sb_attention(qs[0], caches[0], caches[0], None, scale)
            ref32 = reference.sb_attention_ref(
                qs[0][:1].float(), caches[0][:1].float(), caches[0][:1].float(), None, scale
            )
            err = _max_err(out[:1], ref32)
            bitwise = torch.equal(out, ops.sb_attention(qs[0], caches[0], caches[0], None, scale))
            ms = _median_ms(fn, runs * n_sets)
            ms_ref = _median_ms(fn_ref, max(3, runs // 2), warmup=1)
            gbps = cache_bytes / ms / 1e6
            yield dict(
                kind="decode",
                case=f"B={B} S={S} k={K_SLOTS} D={D} bf16",
                path="split-KV",
                regime="random logits",
                ms=ms,
                ref_ms=ms_ref,
                speedup=ms_ref / ms,
                tflops=4 * B * K_SLOTS * S * D / ms / 1e9,
                gspecial_per_s=SPECIAL_PER_PAIR * B * K_SLOTS * S / ms / 1e6,
                gbps=gbps,
                pct_hbm=100 * gbps / HBM_GBPS,
                max_err=err,
                bitwise_repeat=bitwise,
            )
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per case (median reported)")
    parser.add_argument("--quick", action="store_true", help="a few small cases only")
    parser.add_argument("--json", default=None, help="write flat records to this path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench_attention: no CUDA device")
    ops._require_extension()
    if not torch._C._dispatch_has_kernel_for_dispatch_key("molm::sb_attention", "CUDA"):
        raise SystemExit("gpu_bench_attention: molm was built without CUDA kernels")
    gen = torch.Generator(device="cuda").manual_seed(0)
    records = []
    sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        git_sha=sha,
        date=datetime.datetime.now().isoformat(),
    )
    print(
        f"{'kind':<9} {'case':<26} {'path':<21} {'regime':<13} {'molm ms':>9} {'ref ms':>9} {'speedup':>8} "
        f"{'TFLOP/s':>8} {'Gspec/s':>8} "
        f"{'GB/s':>7} {'%HBM':>5} {'max err':>9} {'bitwise':>7}",
        flush=True,
    )
    for rec in [*prefill_cases(args.quick, args.runs, gen), *decode_cases(args.quick, args.runs, gen)]:
        records.append(rec)
        gbps = f"{rec['gbps']:>7.0f}" if rec["gbps"] is not None else f"{'-':>7}"
        pct = f"{rec['pct_hbm']:>5.1f}" if rec["pct_hbm"] is not None else f"{'-':>5}"
        print(
            f"{rec['kind']:<9} {rec['case']:<26} {rec['path']:<21} {rec['regime']:<13} {rec['ms']:>9.3f} "
            f"{rec['ref_ms']:>9.3f} {rec['speedup']:>7.2f}x "
            f"{rec['tflops']:>8.2f} {rec['gspecial_per_s']:>8.1f} {gbps} {pct} {rec['max_err']:>9.2e} "
            f"{str(rec['bitwise_repeat']):>7}",
            flush=True,
        )
        if args.json:  # after every record: a run cut short by a time limit keeps what it measured
            with open(args.json + ".tmp", "w") as f:
                json.dump([dict(meta, **r) for r in records], f, indent=1)
            os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
