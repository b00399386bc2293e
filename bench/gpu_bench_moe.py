"""GPU microbenchmark of the MoE path (routing, permutation, grouped expert GEMM) at MoLM-350M-4B shapes.

C = 1024; MLP experts 32 x (1024 -> 2048 -> 1024), attention experts 16 x (1024 -> 1024); k = 2 and 4;
N = 1, 8, 64, 256, 4096, 65536 tokens; routing uniform or Zipf-skewed (expert popularity ~ 1 / rank^1.2, drawn
with the Gumbel-max trick). For every grouped GEMM: molm's kernel and the baselines (the reference loop of
per-expert torch.mm, padded dense torch.bmm, torch._grouped_mm when this torch has it) against the speed of light,
one dense cuBLAS GEMM with M = sum M_e. Reports median µs (CUDA events), useful TFLOP/s, % of the dense SOL time,
GB/s (activations in + out + the weights of the experts that got rows), and the scaled max error against an fp32
per-expert reference. The layer rows give routing + permutation as a share of the whole MoE MLP layer.

    python bench/gpu_bench_moe.py [--quick] [--dtype bfloat16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
from molm import ops, reference  # noqa: E402

from common import run_metadata  # noqa: E402

C = 1024
SHAPES = {"mlp_up": (32, C, 2048, "gelu_new"), "mlp_down": (32, 2048, C, "none"), "att_proj": (16, C, C, "none")}


def time_us(fn, budget_s: float = 0.05, max_reps: int = 20) -> float:
    """Median time of fn in µs with CUDA events, after warm-up; repetitions sized to a small time budget."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    first = start.elapsed_time(end) / 1e3
    reps = int(max(3, min(max_reps, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def routing_logits(n_tokens: int, n_experts: int, skew: str, gen: torch.Generator) -> torch.Tensor:
    """Logits whose top-k is a draw without replacement from uniform or Zipf(1.2) expert popularity."""
    log_p = torch.zeros(n_experts)
    if skew == "zipf":
        log_p = -1.2 * torch.log(torch.arange(1, n_experts + 1, dtype=torch.float32))
    u = torch.rand(n_tokens, n_experts, generator=gen, device="cuda").clamp_min(1e-12)
    return log_p.cuda() - torch.log(-torch.log(u))


def scaled_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1.0)).item()


def with_sm90_gemm(choice: str, fn):
    """fn run with the CUTLASS sm_90a GEMM switched "on" or "off" (molm.ops.set_kernel_options)."""

    def run():
        with ops.kernel_options_scope(sm90_gemm=choice):
            return fn()

    return run


def gemm_impls(x, w, offsets, activation):
    """name -> callable, for the grouped GEMM and its baselines (each computing act(x_e @ w_e) per segment)."""
    act = reference.gelu_new if activation == "gelu_new" else (lambda t: t)
    bounds = offsets.tolist()
    sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    m, n_out = x.shape[0], w.shape[2]

    def ref_loop():  # the reference's per-expert torch.mm (host offsets: a sync, as the reference op)
        out = x.new_empty(m, n_out)
        b = offsets.tolist()
        for e in range(w.shape[0]):
            if b[e + 1] > b[e]:
                out[b[e] : b[e + 1]] = torch.mm(x[b[e] : b[e + 1]], w[e])
        return act(out)

    impls = {"molm": lambda: ops.expert_gemm(x, w, offsets, activation), "ref_loop": ref_loop}
    if torch.cuda.get_device_capability()[0] == 9 and x.dtype != torch.float32 and m > 32:
        # molm's two Hopper paths side by side: the CUTLASS sm_90a grouped GEMM forced on, and the WMMA tiles
        for name, choice in (("molm_sm90", "on"), ("molm_wmma", "off")):
            impls[name] = with_sm90_gemm(choice, lambda: ops.expert_gemm(x, w, offsets, activation))
    max_rows = max(sizes) if sizes else 0
    if max_rows * w.shape[0] * max(x.shape[1], n_out) <= 2**31:
        padded = x.new_zeros(w.shape[0], max_rows, x.shape[1])
        for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            padded[e, : b - a] = x[a:b]
        # rows of the padded [E * max_rows, N] product that hold real tokens, in expert order
        rows = torch.cat([e * max_rows + torch.arange(s, device=x.device) for e, s in enumerate(sizes)])
        # the padding copy is kept out of the timing; taking the real rows back out is timed
        impls["bmm_padded"] = lambda: act(torch.bmm(padded, w).view(-1, n_out)[rows])
    if hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
        ends = offsets[1:].to(torch.int32)
        w_t = w.transpose(1, 2).contiguous().transpose(1, 2)  # column-major experts, as cuBLASLt prefers
        impls["grouped_mm"] = lambda: act(torch._grouped_mm(x, w_t, offs=ends))
    w_dense = w[0]
    impls["dense_sol"] = lambda: act(torch.mm(x, w_dense))  # same M, K, N in one GEMM
    return impls


def bench_gemm(shape_name, n_tokens, k, skew, dtype, gen, rows):
    n_experts, k_in, n_out, activation = SHAPES[shape_name]
    logits = routing_logits(n_tokens, n_experts, skew, gen)
    _, _, _, _, _, offsets = ops.route_topk(logits, k)
    m = n_tokens * k
    x = torch.randn(m, k_in, generator=gen, device="cuda").to(dtype)
    w = (torch.randn(n_experts, k_in, n_out, generator=gen, device="cuda") * k_in**-0.5).to(dtype)
    counts = (offsets[1:] - offsets[:-1]).cpu()
    active = int((counts > 0).sum())
    flops = 2.0 * m * k_in * n_out
    bytes_moved = (m * k_in + m * n_out + active * k_in * n_out) * x.element_size()
    ref32 = reference.expert_gemm_ref(x.float(), w.float(), offsets, activation)
    times = {}
    for name, fn in gemm_impls(x, w, offsets, activation).items():
        try:
            out = fn()
            err = scaled_err(out, ref32) if name != "dense_sol" else float("nan")
            times[name] = time_us(fn)
        except Exception as exc:  # a baseline this torch / GPU lacks: record why and go on
            rows.append(
                dict(
                    kind="gemm",
                    shape=shape_name,
                    n_tokens=n_tokens,
                    k=k,
                    routing=skew,
                    impl=name,
                    error=f"{type(exc).__name__}: {exc}"[:200],
                )
            )
            continue
        rows.append(
            dict(
                kind="gemm",
                shape=shape_name,
                n_tokens=n_tokens,
                k=k,
                routing=skew,
                impl=name,
                us=times[name],
                tflops=flops / times[name] / 1e6,
                gbps=bytes_moved / times[name] / 1e3,
                max_rows=int(counts.max()),
                active_experts=active,
                max_err=err,
            )
        )
    sol = times.get("dense_sol")
    for r in rows:
        if (
            r.get("shape") == shape_name
            and r["n_tokens"] == n_tokens
            and r["k"] == k
            and r["routing"] == skew
            and "us" in r
            and sol
        ):
            r["pct_sol"] = 100.0 * sol / r["us"]


def bench_layer(n_tokens, k, skew, dtype, gen, rows):
    """The whole MoE MLP layer, and its routing + permutation parts."""
    n_experts, _, ffn, _ = SHAPES["mlp_up"]
    logits = routing_logits(n_tokens, n_experts, skew, gen)
    h = torch.randn(n_tokens, C, generator=gen, device="cuda").to(dtype)
    w1 = (torch.randn(n_experts, C, ffn, generator=gen, device="cuda") * C**-0.5).to(dtype)
    w2 = (torch.randn(n_experts, ffn, C, generator=gen, device="cuda") * ffn**-0.5).to(dtype)
    _, gates, _, ss, sp, off = ops.route_topk(logits, k)
    xs = ops.gather_rows(h, ss, k)
    y = ops.expert_gemm(ops.expert_gemm(xs, w1, off, "gelu_new"), w2, off, "none")

    def layer():
        _, g, _, s1, s2, o = ops.route_topk(logits, k)
        z = ops.expert_gemm(ops.expert_gemm(ops.gather_rows(h, s1, k), w1, o, "gelu_new"), w2, o, "none")
        return ops.scatter_ksum(z, g, s2)

    def layer_moe_mlp():  # the same layer through the fused op
        _, g, _, s1, s2, o = ops.route_topk(logits, k)
        return ops.moe_mlp(h, w1, None, w2, None, g, s1, s2, o, "gelu_new")

    parts = {
        "route_topk": lambda: ops.route_topk(logits, k),
        "gather_rows": lambda: ops.gather_rows(h, ss, k),
        "scatter_ksum": lambda: ops.scatter_ksum(y, gates, sp),
        "layer": layer,
        "layer_moe_mlp": layer_moe_mlp,
    }
    t = {name: time_us(fn) for name, fn in parts.items()}
    share = 100.0 * (t["route_topk"] + t["gather_rows"] + t["scatter_ksum"]) / t["layer"]
    for name, us in t.items():
        rows.append(
            dict(
                kind="layer",
                shape="mlp",
                n_tokens=n_tokens,
                k=k,
                routing=skew,
                impl=name,
                us=us,
                routing_share_pct=share if name == "layer" else None,
            )
        )


def write_json(path: str, rows: list[dict], dtype: str) -> None:
    meta = run_metadata()
    meta.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, dtype=dtype)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="N in {8, 4096}, k = 2, MLP shapes only")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench_moe: needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = (8, 4096) if args.quick else (1, 8, 64, 256, 4096, 65536)
    ks = (2,) if args.quick else (2, 4)
    shapes = ("mlp_up", "mlp_down") if args.quick else tuple(SHAPES)
    rows: list[dict] = []
    for n in tokens:
        for k in ks:
            for skew in ("uniform", "zipf"):
                for shape in shapes:
                    bench_gemm(shape, n, k, skew, dtype, gen, rows)
                bench_layer(n, k, skew, dtype, gen, rows)
                torch.cuda.empty_cache()
            print(f"... N={n} k={k} done", file=sys.stderr, flush=True)
            if args.json:  # after every step, so a run cut short by a time limit still leaves its results
                write_json(args.json, rows, args.dtype)
    print(
        f"{'kind':6} {'shape':9} {'N':>6} {'k':>2} {'routing':8} {'impl':13} {'µs':>10} {'TFLOP/s':>8} "
        f"{'%SOL':>6} {'GB/s':>7} {'err':>8}"
    )
    for r in rows:
        if "error" in r:
            print(
                f"{r['kind']:6} {r['shape']:9} {r['n_tokens']:>6} {r['k']:>2} {r['routing']:8} {r['impl']:13} "
                f"failed: {r['error'][:60]}"
            )
            continue
        extra = (
            f"{r['tflops']:8.1f} {r.get('pct_sol', float('nan')):6.1f} {r['gbps']:7.0f} {r['max_err']:8.1e}"
            if r["kind"] == "gemm"
            else (
                f"  routing+permutation = {r['routing_share_pct']:.1f} % of the layer" if r["routing_share_pct"] else ""
            )
        )
        print(
            f"{r['kind']:6} {r['shape']:9} {r['n_tokens']:>6} {r['k']:>2} {r['routing']:8} {r['impl']:13} "
            f"{r['us']:10.1f} {extra}"
        )
    if args.json:
        write_json(args.json, rows, args.dtype)


if __name__ == "__main__":
    main()
