"""CPU microbenchmark of every molm op against its pure-torch reference at MoLM-350M-4B shapes.

C = 1024; MLP experts 32 x (1024 -> 2048 -> 1024) with gelu_new; attention experts 16 x (1024 -> 1024), one head
of D = 1024, k = 2; N = 1, 8, 256 tokens; attention decode S = 1024 / 4096 and prefill T = S = 512 / 1024.
Both implementations get the same inputs and the same routing. Prints one row per case (median µs, speedup, max
abs error vs the reference, bitwise repeatability) and writes flat records with `--json PATH`.

    python bench/bench_ops.py [--dtype float32|bfloat16] [--runs 20] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch

from molm import ops, reference

from common import median_seconds, run_metadata

C, K_SLOTS = 1024, 2
E_MLP, F_MLP, E_ATT, D_ATT = 32, 2048, 16, 1024


def _median_us(fn, runs: int) -> float:
    return median_seconds(fn, runs, warmup=2) * 1e6


def _max_err(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(_max_err(x, y) for x, y in zip(a, b))
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _equal(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def _routing(n_tokens: int, n_experts: int, gen: torch.Generator):
    logits = torch.randn(n_tokens, n_experts, generator=gen)
    return reference.route_topk_ref(logits, K_SLOTS)


def _sb_backward(q, kv, grad, scale):
    """(dq, d kv) from the fused backward op, K = V = kv."""
    dq, dk, dv, _ = torch.ops.molm.sb_attention_backward(grad, q, kv, kv, None, scale, False)
    return dq, dk + dv


def _sb_backward_fallback(q, kv, grad, scale):
    """The backward molm used before the fused op: autograd through the fp32 reference."""
    q32, kv32 = q.float().requires_grad_(), kv.float().requires_grad_()
    out = reference.sb_attention_ref(q32, kv32, kv32, None, scale)
    dq, dkv = torch.autograd.grad(out, (q32, kv32), grad.float())
    return dq.to(q.dtype), dkv.to(kv.dtype)


def _moe_mlp_unfused(h, w1, w2, gates, sorted_slots, slot_positions, offsets):
    """The MoE MLP as four ops: gather the rows into expert order, two grouped GEMMs, the gate-weighted k-sum."""
    x = ops.expert_gemm(ops.gather_rows(h, sorted_slots, K_SLOTS), w1, offsets, "gelu_new")
    return ops.scatter_ksum(ops.expert_gemm(x, w2, offsets, "none"), gates, slot_positions)


def cases(dtype: torch.dtype, quick: bool):
    """Yields (family, shape text, fn_molm, fn_ref, flops, bytes)."""
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    for n in (1, 8, 256):
        logits = rnd(n, E_MLP)
        yield (
            "route_topk",
            f"N={n} E={E_MLP} k={K_SLOTS}",
            lambda a=logits: ops.route_topk(a, K_SLOTS),
            lambda a=logits: reference.route_topk_ref(a, K_SLOTS),
            0,
            logits.numel() * logits.element_size(),
        )
        _, gates, _, sorted_slots, slot_positions, offsets = _routing(n, E_MLP, gen)
        gates = gates.to(dtype)
        h = rnd(n, C)
        yield (
            "gather_rows",
            f"N={n} C={C} k={K_SLOTS}",
            lambda h=h, s=sorted_slots: ops.gather_rows(h, s, K_SLOTS),
            lambda h=h, s=sorted_slots: reference.gather_rows_ref(h, s, K_SLOTS),
            0,
            2 * h.nbytes * K_SLOTS,
        )
        y = rnd(n * K_SLOTS, C)
        yield (
            "scatter_ksum",
            f"N={n} C={C} k={K_SLOTS}",
            lambda y=y, g=gates, p=slot_positions: ops.scatter_ksum(y, g, p),
            lambda y=y, g=gates, p=slot_positions: reference.scatter_ksum_ref(y, g, p),
            2 * y.numel(),
            y.nbytes * 3 // 2,
        )
        # the whole MoE MLP: fused (one op) and as the grouped-GEMM ops compose it
        w1 = rnd(E_MLP, C, F_MLP) * C**-0.5
        w2 = rnd(E_MLP, F_MLP, C) * F_MLP**-0.5
        routing = (gates, sorted_slots, slot_positions, offsets)
        touched = int((offsets[1:] > offsets[:-1]).sum())
        for family, fn in (
            ("moe_mlp", lambda h=h, w1=w1, w2=w2, r=routing: ops.moe_mlp(h, w1, None, w2, None, *r, "gelu_new")),
            ("moe_mlp_unfused", lambda h=h, w1=w1, w2=w2, r=routing: _moe_mlp_unfused(h, w1, w2, *r)),
        ):
            yield (
                family,
                f"N={n} {E_MLP}x{C}->{F_MLP}->{C}",
                fn,
                lambda h=h, w1=w1, w2=w2, r=routing: reference.moe_mlp_ref(h, w1, None, w2, None, *r),
                4 * n * K_SLOTS * C * F_MLP,
                touched * 2 * C * F_MLP * w1.element_size(),
            )
        for name, e, k_in, n_out, act in (
            ("mlp_up", E_MLP, C, F_MLP, "gelu_new"),
            ("mlp_down", E_MLP, F_MLP, C, "none"),
            ("att_q", E_ATT, C, D_ATT, "none"),
        ):
            if e != E_MLP:
                _, _, _, _, _, offsets_e = _routing(n, e, gen)
            else:
                offsets_e = offsets
            x = rnd(n * K_SLOTS, k_in)
            w = rnd(e, k_in, n_out) * k_in**-0.5
            touched = int((offsets_e[1:] > offsets_e[:-1]).sum())
            yield (
                "expert_gemm",
                f"{name} N={n} {e}x{k_in}->{n_out} {act}",
                lambda x=x, w=w, o=offsets_e, a=act: ops.expert_gemm(x, w, o, a),
                lambda x=x, w=w, o=offsets_e, a=act: reference.expert_gemm_ref(x, w, o, a),
                2 * x.shape[0] * k_in * n_out,
                touched * k_in * n_out * w.element_size(),
            )
    att = [("decode", 1, 1024), ("decode", 1, 4096), ("prefill", 512, 512), ("prefill", 1024, 1024)]
    if quick:
        att = att[:2] + att[2:3]
    for kind, t, s in att:
        q = rnd(1, t, K_SLOTS, 1, D_ATT)
        kv = rnd(1, s, 1, D_ATT)  # MoLM: K = V = ln_1 output
        bias = torch.zeros(1, s)
        scale = D_ATT**-0.5
        pairs = t * s - t * (t - 1) // 2  # causal (query, key) pairs
        yield (
            "sb_attention",
            f"{kind} T={t} S={s} k={K_SLOTS} D={D_ATT}",
            lambda q=q, kv=kv, b=bias: ops.sb_attention(q, kv, kv, b, scale),
            lambda q=q, kv=kv, b=bias: reference.sb_attention_ref(q, kv, kv, b, scale),
            4 * K_SLOTS * pairs * D_ATT,
            kv.nbytes + 2 * q.nbytes,
        )
    for t in (256,) if quick else (256, 512):  # backward: fused op vs the old fallback (fp32 reference autograd)
        q, kv, grad = rnd(1, t, K_SLOTS, 1, D_ATT), rnd(1, t, 1, D_ATT), rnd(1, t, K_SLOTS, 1, D_ATT)
        scale = D_ATT**-0.5
        yield (
            "sb_attn_bwd",
            f"prefill T={t} S={t} k={K_SLOTS} D={D_ATT}",
            lambda q=q, kv=kv, g=grad: _sb_backward(q, kv, g, scale),
            lambda q=q, kv=kv, g=grad: _sb_backward_fallback(q, kv, g, scale),
            10 * K_SLOTS * (t * (t + 1) // 2) * D_ATT,
            3 * kv.nbytes + 3 * q.nbytes,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per case (median reported)")
    parser.add_argument("--quick", action="store_true", help="skip the largest prefill case")
    parser.add_argument("--json", default=None, help="write flat records to this path")
    args = parser.parse_args()
    ops._require_extension()
    dtype = getattr(torch, args.dtype)
    records = []
    print(
        f"{'op':<13} {'case':<42} {'molm µs':>10} {'ref µs':>10} {'speedup':>8} {'GFLOP/s':>8} {'GB/s':>7} "
        f"{'max err':>9} {'bitwise':>7}"
    )
    for family, shape, fn, fn_ref, flops, nbytes in cases(dtype, args.quick):
        runs = max(3, args.runs // 4) if "prefill" in shape else args.runs
        out, out_ref = fn(), fn_ref()
        us = _median_us(fn, runs)
        us_ref = _median_us(fn_ref, runs)
        rec = dict(
            op=family,
            case=shape,
            dtype=args.dtype,
            molm_us=us,
            ref_us=us_ref,
            speedup=us_ref / us,
            gflops=flops / us / 1e3,
            gbps=nbytes / us / 1e3,
            max_err=_max_err(out, out_ref),
            bitwise_repeat=_equal(out, fn()),
        )
        records.append(rec)
        print(
            f"{family:<13} {shape:<42} {us:>10.1f} {us_ref:>10.1f} {rec['speedup']:>7.2f}x {rec['gflops']:>8.1f} "
            f"{rec['gbps']:>7.2f} {rec['max_err']:>9.2e} {str(rec['bitwise_repeat']):>7}"
        )
    if args.json:
        meta = dict(run_metadata(), avx2=ops._C.cpu_uses_avx2())
        with open(args.json, "w") as f:
            json.dump([dict(meta, **r) for r in records], f, indent=1)


if __name__ == "__main__":
    main()
