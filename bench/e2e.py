"""End-to-end GPU benchmark: MoLM configs with random bf16 weights, molm vs the reference backend vs a dense model.

    python bench/e2e.py --json bench/results/e2e.json            # on a CUDA machine (bench/gpu_check.sh runs it)
    python bench/e2e.py --device cpu --smoke                      # a seconds-long run of the same code paths

For every model and implementation:
  * paper_setting: the setting of the ModuleFormer README's speed table as far as it can be inferred (one forward
    of 16 x 2048 tokens:
    latency ms, throughput tok/s, peak memory GB; the README reports 497 ms / 71,017 tok/s / 27 GB for
    MoLM-350M-4B and does not state batch or length — 71,017 tok/s x 0.497 s ~ 35k tokens ~ 16 x 2048),
  * decode at batch 1 / 8 / 64 and context 128 / 1024 / 4096 (tok/s and % of the HBM roofline: bytes the step
    must read / time / --hbm-gbs),
  * prefill 32 x 2048 (tok/s) and time to first token for one 2048-token prompt.
Implementations: `extension` (molm's kernels; decode steps replayed from CUDA graphs), `reference` (the original
algorithm in eager torch) and `dense` (a GPT of equal active parameters from torch's own layers, SDPA attention,
decode steps replayed from CUDA graphs too). The expert-load histogram of the prefill run goes to --png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import molm  # noqa: E402
from molm import ops  # noqa: E402
from molm.config import PRESETS  # noqa: E402
from molm.engine import StaticDecoder  # noqa: E402
from molm.plotting import pyplot  # noqa: E402

from common import random_model, run_metadata  # noqa: E402

OP_NAMES = ["route_topk", "gather_rows", "scatter_ksum", "expert_gemm", "expert_gemm_wgrad", "sb_attention"]


def cuda_kernels() -> dict:
    """Which molm ops have a CUDA kernel in this build (a missing one would make the extension backend fail)."""
    if not ops.extension_available():
        return {name: False for name in OP_NAMES}
    return {name: torch._C._dispatch_has_kernel_for_dispatch_key(f"molm::{name}", "CUDA") for name in OP_NAMES}


class Timer:
    """Wall time of a region; on CUDA with events (no host sync inside the region)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------------------------
# dense control: a pre-LN GPT with the same width, depth and active parameters per token


class DenseBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x, cache_k, cache_v, position, window):
        """x [B, T, C]; cache [B, H, S_max, D]. Prefill (position None): causal SDPA over the T new tokens, written
        at 0..T-1. Decode (T = 1, position a [1] device tensor): write at `position`, attend to positions <= it
        within the first `window`."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if position is None:
            cache_k[:, :, :T], cache_v[:, :, :T] = k, v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cache_k.index_copy_(2, position, k)
            cache_v.index_copy_(2, position, v)
            visible = (torch.arange(window, device=x.device) <= position).view(1, 1, 1, window)
            a = F.scaled_dot_product_attention(q, cache_k[:, :, :window], cache_v[:, :, :window], attn_mask=visible)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.ln_2(x)), approximate="tanh"))


class DenseLM(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, hidden: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(DenseBlock(width, heads, hidden) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, ids, caches, position=None, window=0):
        x = self.wte(ids)
        for block, (ck, cv) in zip(self.blocks, caches):
            x = block(x, ck, cv, position, window)
        return self.lm_head(self.ln_f(x[:, -1])).float()  # [B, V]


def dense_twin(config, dtype, device) -> DenseLM:
    """Same width/depth/vocab; 16 heads of 64; MLP hidden chosen so the active parameters per token match."""
    C = config.n_embd
    moe_active = config.k_att * 2 * C * config.att_hidden + config.k_mlp * 2 * C * config.ffd_hidden
    router = 2 * (C * config.gating_size + config.gating_size * max(config.n_att_experts, config.n_mlp_experts))
    hidden = max(256, round((moe_active + router - 4 * C * C) / (2 * C) / 256) * 256)
    with torch.device("meta"):
        model = DenseLM(config.vocab_size, C, config.n_layer, max(1, C // 64), hidden)
    model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            (
                p.fill_(1.0)
                if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight"
                else p.zero_()
                if name.endswith("bias")
                else p.normal_(0.0, 0.02)
            )
    return model.eval()


def active_params(model) -> int:
    if isinstance(model, DenseLM):
        return sum(p.numel() for p in model.parameters())
    return model.num_parameters(active=True)


# ---------------------------------------------------------------------------------------------------------------
# measurements


def decode_bytes_per_step(config, batch: int, context: int, element: int = 2) -> float:
    """Bytes a MoLM decode step must read at least: every expert chosen by some row (expected count under uniform
    routing), routers, norms, lm_head and the KV cache (stored once when K = V)."""
    C = config.n_embd

    def touched(E, k):  # expected distinct experts among `batch` rows picking k of E uniformly
        return E * (1 - (1 - k / E) ** batch)

    per_layer = (
        touched(config.n_att_experts, config.k_att) * 2 * C * config.att_hidden
        + touched(config.n_mlp_experts, config.k_mlp) * 2 * C * config.ffd_hidden
        + 2 * (C * config.gating_size + config.gating_size * config.n_mlp_experts)
        + 4 * C
        + batch * context * config.att_hidden * (1 if config.identity_kv else 2)
    )
    return element * (config.n_layer * per_layer + config.vocab_size * C)


def dense_decode_bytes(model: DenseLM, batch: int, context: int, element: int = 2) -> float:
    C = model.wte.weight.shape[1]
    return element * (
        sum(p.numel() for p in model.parameters())
        - model.wte.weight.numel()
        + len(model.blocks) * batch * context * 2 * C
    )


class RandomCacheDecoder:
    """Greedy decode steps from `context` cached positions of random contents (timing only), with room for `room`
    more; eager or replayed from CUDA graphs."""

    def __init__(self, model, batch: int, context: int, room: int, graphs: bool):
        cache = molm.KVCache.for_model(model, batch, context + room)
        for buf in cache.keys:
            buf.normal_()
        self.mask = torch.zeros(batch, cache.capacity, dtype=torch.long, device=model.device)
        self.mask[:, :context] = 1
        self.decoder = StaticDecoder(model, cache, self.mask, cuda_graphs=graphs)
        self.tokens = torch.randint(0, model.config.vocab_size, (batch,), device=model.device)
        self.position = context

    def step(self):
        self.mask[:, self.position] = 1
        self.tokens = self.decoder.step(self.tokens, self.position).argmax(-1)
        self.position += 1


def decode_molm(model, batch: int, context: int, steps: int, graphs: bool) -> float:
    """Seconds per decode step at `context` cached positions (random cache contents; timing only)."""
    decoder = RandomCacheDecoder(model, batch, context, steps + 1, graphs)
    for _ in range(2):  # warm-up (captures the graph of the window)
        decoder.step()
    with Timer(model.device) as t:
        for _ in range(steps - 1):
            decoder.step()
    return t.seconds / (steps - 1)


def decode_dense(model: DenseLM, batch: int, context: int, steps: int) -> float:
    device, dtype = model.wte.weight.device, model.wte.weight.dtype
    blk = model.blocks[0]
    C, H = model.wte.weight.shape[1], blk.heads
    capacity = context + steps + 1
    caches = [
        (
            torch.randn(batch, H, capacity, C // H, device=device, dtype=dtype),
            torch.randn(batch, H, capacity, C // H, device=device, dtype=dtype),
        )
        for _ in model.blocks
    ]
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
    position = torch.zeros(1, dtype=torch.long, device=device)
    window = 1 << math.ceil(math.log2(context + steps + 1))
    window = min(window, capacity)

    def step():
        return model(tokens, caches, position, window)

    graph = None
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
    with Timer(device) as t:
        for i in range(steps):
            position.fill_(context + i)
            if graph is not None:
                graph.replay()
            else:
                logits = step()
            tokens.copy_(logits.argmax(-1, keepdim=True))
    return t.seconds / steps


def forward_seconds(model, batch: int, length: int, repeats: int = 2) -> tuple[float, float]:
    """(median seconds of one full forward over batch x length tokens with a cache, peak GB during it)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, 500, (batch, length), device=device)
    if isinstance(model, DenseLM):
        C, H = model.wte.weight.shape[1], model.blocks[0].heads
        caches = [
            (torch.empty(batch, H, length, C // H, device=device, dtype=model.wte.weight.dtype),) * 2
            for _ in model.blocks
        ]
        run = lambda: model(ids, caches)  # noqa: E731
    else:
        run = lambda: model(  # noqa: E731
            ids,
            past_key_values=molm.KVCache.for_model(model, batch, length),
            use_cache=True,
            return_aux_loss=False,
            logits_to_keep=1,
        )
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        with Timer(device) as t:
            run()
        times.append(t.seconds)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def expert_load(model, batch: int, length: int) -> dict:
    """Per layer, tokens routed to each expert in one forward (attention and MLP routers)."""
    counts = {"attention": [], "mlp": []}
    hooks = []
    for block in model.transformer.h:
        for kind, router in (("attention", block.attn.q_proj.gate), ("mlp", block.mlpf.gate)):
            hooks.append(
                router.register_forward_hook(
                    lambda mod, args, out, kind=kind: counts[kind].append(out[0].expert_offsets.diff().cpu().tolist())
                )
            )
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=model.device)
    try:
        model(ids, return_aux_loss=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return counts


def plot_load(loads: dict, path: str) -> None:
    plt = pyplot(path)
    if plt is None:
        return
    rows = [
        (name, kind, torch.tensor(c, dtype=torch.float64))
        for name, load in loads.items()
        for kind, c in load.items()
        if c
    ]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for ax, (name, kind, c) in zip(axes[:, 0], rows):
        share = c / c.sum(1, keepdim=True)
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis")
        ax.set_title(f"{name}: {kind} experts, share of routed slots per layer (random weights)")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["MoLM-350M-4B", "MoLM-700M-4B", "MoLM-700M-8B"])
    parser.add_argument("--impls", nargs="+", default=["extension", "reference", "dense"])
    parser.add_argument(
        "--reference-models",
        nargs="+",
        default=["MoLM-350M-4B"],
        help="models also run with the slow reference backend and the dense twin",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hbm-gbs", type=float, default=4300.0, help="measured copy bandwidth, GB/s (H200 ~4300)")
    parser.add_argument("--smoke", action="store_true", help="a tiny config and sizes: checks the code paths")
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None, help="expert-load heat map (default: next to --json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    if args.smoke:
        args.batches, args.contexts, args.steps = [1, 2], [8, 24], 3
        paper_shape, prefill_shape, ttft_len = (2, 32), (2, 32), 32
    else:
        paper_shape, prefill_shape, ttft_len = (16, 2048), (32, 2048), 2048
    kernels = cuda_kernels() if device.type == "cuda" else {}
    if kernels and not all(kernels.values()):
        print(
            f"WARNING: ops without a CUDA kernel (the extension backend will fail on them): "
            f"{[k for k, v in kernels.items() if not v]}"
        )
    records, loads = [], {}

    def write_json():
        meta = run_metadata()
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            meta.update(gpu=props.name, cuda=torch.version.cuda, gpu_memory_GB=props.total_memory / 1e9)
        meta.update(
            cuda_kernels=kernels,
            hbm_gbs_assumed=args.hbm_gbs,
            dtype="bfloat16",
            smoke=args.smoke,
            note="random weights (normal 0.02); decode caches hold random values; timing only",
        )
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "records": records, "expert_load": loads}, f, indent=1)

    def measure(model, impl, config, rec):
        with torch.inference_mode():
            if impl == "extension":
                loads[name] = expert_load(model, *prefill_shape[:1], min(prefill_shape[1], 512))
            seconds, peak = forward_seconds(model, *paper_shape)
            rec["paper_setting"] = {
                "batch": paper_shape[0],
                "length": paper_shape[1],
                "latency_ms": seconds * 1e3,
                "throughput_tok_s": paper_shape[0] * paper_shape[1] / seconds,
                "peak_memory_GB": peak,
            }
            seconds, peak = forward_seconds(model, *prefill_shape)
            rec["prefill"] = {
                "batch": prefill_shape[0],
                "length": prefill_shape[1],
                "tok_s": prefill_shape[0] * prefill_shape[1] / seconds,
                "peak_memory_GB": peak,
            }
            seconds, _ = forward_seconds(model, 1, ttft_len)
            rec["ttft_ms"] = {"length": ttft_len, "ms": seconds * 1e3}
            print(
                f"   paper setting {paper_shape}: {rec['paper_setting']['latency_ms']:.1f} ms, "
                f"{rec['paper_setting']['throughput_tok_s']:.0f} tok/s, "
                f"{rec['paper_setting']['peak_memory_GB']:.1f} GB;"
                f" prefill {prefill_shape}: {rec['prefill']['tok_s']:.0f} tok/s; TTFT {rec['ttft_ms']['ms']:.1f} ms"
            )
            rec["decode"] = []
            for batch in args.batches:
                for context in args.contexts:
                    if impl == "dense":
                        step = decode_dense(model, batch, context, args.steps)
                        nbytes = dense_decode_bytes(model, batch, context)
                    else:
                        step = decode_molm(
                            model, batch, context, args.steps, graphs=impl == "extension" and device.type == "cuda"
                        )
                        nbytes = decode_bytes_per_step(config, batch, context)
                    tok_s = batch / step
                    roofline = nbytes / step / 1e9 / args.hbm_gbs * 100
                    rec["decode"].append(
                        {
                            "batch": batch,
                            "context": context,
                            "tok_s": tok_s,
                            "step_ms": step * 1e3,
                            "bytes_per_step": nbytes,
                            "pct_hbm_roofline": roofline,
                        }
                    )
                    print(
                        f"   decode B={batch:<3} ctx={context:<5} {tok_s:>10.0f} tok/s  {step * 1e3:8.3f} ms/step"
                        f"  {roofline:5.1f} % of HBM roofline"
                    )

    for name in args.models:
        config = (
            PRESETS[name]()
            if not args.smoke
            else PRESETS[name]().replace(
                n_layer=2, n_embd=64, att_hidden=64, ffd_hidden=128, gating_size=32, vocab_size=512
            )
        )
        moe = random_model(config, dtype, device, backend="extension")
        impls = [i for i in args.impls if i == "extension" or name in args.reference_models or args.smoke]
        for impl in impls:
            if impl == "dense":
                model = dense_twin(config, dtype, device)
            else:
                model = moe.set_backend(impl)
            rec = {"model": name, "impl": impl, "active_params": active_params(model)}
            print(f"== {name} / {impl}: {rec['active_params'] / 1e6:.1f} M active parameters")
            try:
                measure(model, impl, config, rec)
            except Exception as exc:  # noqa: BLE001 - one failing implementation must not hide the others
                rec["error"] = f"{type(exc).__name__}: {exc}"
                print(f"   FAILED: {rec['error']}")
            records.append(rec)
            write_json()  # after every record: a run cut short by a time limit keeps what it measured
            del model
        del moe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        print(f"wrote {args.json}")
    png = args.png or (os.path.splitext(args.json)[0] + "_expert_load.png" if args.json else None)
    if png and loads:
        plot_load(loads, png)


if __name__ == "__main__":
    main()
