"""Quality of int8 weight-only quantization: perplexity on held-out text and greedy-token agreement with bf16.

    python bench/quantization_quality.py [--model DIR] [--text FILE] [--json bench/results/quantization_quality.json]

Without --model it measures the embedded default model; --text defaults to bench/data/heldout.txt (public-domain
English: two Shakespeare sonnets and the openings of A Tale of Two Cities and Pride and Prejudice).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

import molm
from molm.train import perplexity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "To be, or not to be",
    "ROMEO.",
    "It was the best of times",
    "My lord, the king",
    "Shall I compare thee",
    "The quality of mercy",
    "Now is the winter",
    "Friends, Romans, countrymen",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(ROOT, "molm", "default_model"))
    parser.add_argument("--text", default=os.path.join(ROOT, "bench", "data", "heldout.txt"))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tokenizer = molm.load_tokenizer(args.model)
    text = open(args.text, encoding="utf-8").read()
    tokens = torch.tensor(tokenizer.encode(text).ids)
    variants = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8")}
    records, greedy = {}, {}
    for name, (dtype, quantize) in variants.items():
        model = molm.load(args.model, dtype=dtype, quantize=quantize)
        with torch.no_grad():
            ppl = perplexity(model, tokens, seq_len=64, batch_size=8)
            greedy[name] = [molm.generate(model, p, max_new_tokens=args.new_tokens) for p in PROMPTS]
        records[name] = {"perplexity": ppl, "bits_per_byte": math.log2(ppl) * len(tokens) / len(text.encode())}
    for name in variants:
        same = sum(a == b for a, b in zip(greedy[name], greedy["bf16"]))
        records[name]["greedy_same_as_bf16"] = f"{same}/{len(PROMPTS)}"
        records[name]["perplexity_vs_bf16_pct"] = 100 * (
            records[name]["perplexity"] / records["bf16"]["perplexity"] - 1
        )
    print(f"{args.model}: {len(tokens)} tokens of {os.path.basename(args.text)}")
    print(f"{'weights':<8} {'perplexity':>11} {'bits/byte':>10} {'vs bf16':>9} {'greedy = bf16':>14}")
    for name, r in records.items():
        print(
            f"{name:<8} {r['perplexity']:>11.3f} {r['bits_per_byte']:>10.4f} {r['perplexity_vs_bf16_pct']:>+8.2f}% "
            f"{r['greedy_same_as_bf16']:>14}"
        )
    if args.json:
        meta = {
            "model": os.path.relpath(args.model, ROOT),
            "text": os.path.relpath(args.text, ROOT),
            "tokens": len(tokens),
            "torch": torch.__version__,
            "new_tokens": args.new_tokens,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
