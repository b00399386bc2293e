"""CPU decode and prefill throughput of both backends on a random model with MoLM-350M-4B widths.

    python bench/cpu_generate.py --layers 4 --json bench/results/cpu_generate.json

Prints one row per (dtype, batch, backend): prefill tok/s, decode tok/s, and the extension/reference speedup.
Decode is timed after a prefill of --prompt tokens, one token per sequence per step, with the KV cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import median_seconds, peak_rss_gb, random_model, run_metadata

import molm
from molm.config import PRESETS


def decode_bytes_per_step(model, context: int) -> int:
    """Bytes a batch-1 decode step must read at least: lm_head, routers, norms, the k chosen experts of every MoE
    site and the KV cache (once per layer when K = V)."""
    c = model.config
    size = model.transformer.wte.weight.element_size()
    layer = model.transformer.h[0]
    per_layer = sum(p.numel() for name, p in layer.named_parameters() if "experts" not in name)
    per_layer += c.k_att * 2 * c.n_embd * c.att_hidden + c.k_mlp * 2 * c.n_embd * c.ffd_hidden
    per_layer += context * c.att_hidden * (1 if c.identity_kv else 2)
    return size * (c.n_layer * per_layer + c.vocab_size * c.n_embd + c.n_embd)


def decode_rate(model, batch: int, prompt: int, steps: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))

    def run():
        cache = molm.KVCache.for_model(model, batch, prompt + steps)
        model(ids, past_key_values=cache, use_cache=True, return_aux_loss=False, logits_to_keep=1)
        token = ids[:, -1:]
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True, return_aux_loss=False, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - start

    run()  # warm-up
    seconds = statistics.median(run() for _ in range(2))
    return batch * steps / seconds


def prefill_rate(model, batch: int, length: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    seconds = median_seconds(lambda: model(ids, return_aux_loss=False, logits_to_keep=1), runs=2)
    return batch * length / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="layers of the MoLM-350M-4B config to keep (24 = full)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompt", type=int, default=128, help="prompt length before decoding")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--prefill", type=int, default=256, help="prefill length per sequence")
    parser.add_argument("--backends", nargs="+", default=["reference", "extension"])
    parser.add_argument("--json", default=None, help="write the records to this path")
    args = parser.parse_args()

    config = PRESETS["MoLM-350M-4B"]().replace(n_layer=args.layers)
    records = []
    print(f"MoLM-350M-4B widths, {args.layers} layers, torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = (f"{'dtype':>9} {'batch':>5} {'backend':>10} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode x':>9} "
              f"{'decode GB/s':>12} {'peak RSS GB':>12}")
    print(header)
    print("-" * len(header))
    for dtype_name in args.dtypes:
        # built straight in the dtype: the full 24-layer model is 4 B parameters (16 GB in fp32, 8 GB in bf16)
        model = random_model(config, getattr(torch, dtype_name), "cpu", backend="reference", seed=0)
        for batch in args.batches:
            rates = {}
            for backend in args.backends:
                try:
                    model.set_backend(backend)
                except RuntimeError as exc:
                    print(f"{dtype_name:>9} {batch:>5} {backend:>10}  unavailable: {exc}")
                    continue
                with torch.inference_mode():
                    prefill = prefill_rate(model, batch, args.prefill)
                    decode = decode_rate(model, batch, args.prompt, args.steps)
                rates[backend] = decode
                speedup = decode / rates["reference"] if "reference" in rates else float("nan")
                # weight bytes are shared by the batch only when rows pick the same experts: report batch 1 only
                gbs = decode_bytes_per_step(model, args.prompt + args.steps // 2) * decode / 1e9 if batch == 1 \
                    else float("nan")
                rss = peak_rss_gb()
                print(f"{dtype_name:>9} {batch:>5} {backend:>10} {prefill:>14.1f} {decode:>13.2f} {speedup:>8.2f}x "
                      f"{gbs:>12.2f} {rss:>12.1f}")
                records.append({"dtype": dtype_name, "batch": batch, "backend": backend, "layers": args.layers,
                                "prompt": args.prompt, "prefill_len": args.prefill, "prefill_tok_s": prefill,
                                "decode_tok_s": decode, "decode_speedup_vs_reference": speedup,
                                "decode_GB_s_batch1": None if batch != 1 else gbs, "peak_rss_GB": rss})
        del model
    if args.json:
        meta = run_metadata()
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=2)


if __name__ == "__main__":
    main()
