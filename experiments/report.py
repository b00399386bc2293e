"""Markdown tables from experiments/results.json (written by run.py). Run: python experiments/report.py"""

import json
import os
import sys


def main(path: str) -> None:
    r = json.load(open(path))
    print("**1. Pretraining on A** (validation perplexity, lower is better)\n")
    print("| model | params | active / token | ppl A | ppl B |")
    print("|---|---|---|---|---|")
    for name, row in r["pretrain"].items():
        label = "ModuleFormer (8+8 experts, top-2)" if name == "moe" else "dense control (1 expert, k=1)"
        print(
            f"| {label} | {row['params'] / 1e6:.2f} M | {row['active_params'] / 1e6:.2f} M | {row['ppl_A']:.1f} "
            f"| {row['ppl_B']:.1f} |"
        )
    print("\n**2. Continued training on B** (A = forgetting, B = learning)\n")
    print("| run | trained params | ppl A before → after | ppl B before → after |")
    print("|---|---|---|---|")
    labels = {
        "moe_full": "(a) ModuleFormer, full finetune",
        "moe_extend_frozen": "(b) ModuleFormer + 4+4 new experts/layer, old frozen",
        "dense_full": "(c) dense, full finetune",
    }
    for name, row in r["extend"].items():
        extra = (
            f" (after extend, untrained: A {row['ppl_A_at_extend']:.1f}, B {row['ppl_B_at_extend']:.1f})"
            if "ppl_A_at_extend" in row
            else ""
        )
        print(
            f"| {labels[name]}{extra} | {row['trainable_params'] / 1e6:.2f} M | {row['ppl_A_before']:.1f} → "
            f"{row['ppl_A_after']:.1f} | {row['ppl_B_before']:.1f} → {row['ppl_B_after']:.1f} |"
        )
    share = r["extend"]["moe_extend_frozen"].get("new_expert_share")
    if share:
        print(
            f"\nAfter (b), the 4 new experts per layer (1/3 of all) take {share['att'] * 100:.0f} % of the attention "
            f"and {share['mlp'] * 100:.0f} % of the MLP selections on B (`usage_extend.png`)."
        )
    print(
        "\n**3. Pruning after finetuning on B** (ppl on B validation; checkpoint bytes fp32; forward tokens/s, "
        "batch 16 × 64, 1 thread)\n"
    )
    print("| finetune | experts kept | ppl B | ppl B, rescale=True | checkpoint | tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, row in r["prune"].items():
        for key in row["ppl_B_val"]:
            size, rescaled = key.split(" ")[0], row["ppl_B_val_rescaled"].get(key)
            print(
                f"| {name} | {key} | {row['ppl_B_val'][key]:.1f} | {'' if rescaled is None else f'{rescaled:.1f}'} | "
                f"{row['bytes'][size] / 1e6:.1f} MB | {row['tokens_per_s'][size]:,} |"
            )
    print()
    for name, row in r["prune"].items():
        print(
            f"- {name}: the two most used MLP experts take {row['usage_top2_share_mlp'] * 100:.0f} % of the "
            "MLP selections on average per layer (uniform: 25 %)."
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"))
