"""The `molm` command: argparse and printing only."""

from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPE_NAMES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="auto", help="weights dtype (auto = as stored)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=["extension", "reference"], default=None,
                   help="ops backend (default: extension when built)")


def cmd_generate(args) -> int:
    import molm

    model = molm.load(args.model, dtype=DTYPE_NAMES[args.dtype], device=args.device, backend=args.backend,
                      progress=sys.stderr.isatty())
    tokenizer = molm.load_tokenizer(args.tokenizer or model.name_or_path)
    pieces = molm.generate(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop, tokenizer=tokenizer,
                           stream=True)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130
    sys.stdout.write("\n")
    return 0


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.2f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.2f}P{unit}"


def model_info(path) -> dict:
    """Sizes of a checkpoint directory without reading its weights (the model is built on the meta device)."""
    from .config import ModuleFormerConfig
    from .loading import model_class, resolve, weight_files

    directory = resolve(path)
    config = ModuleFormerConfig.from_pretrained(directory)
    cls = model_class(config, os.path.join(directory, "config.json"))
    with torch.device("meta"):
        model = cls(config, backend="reference")
    files = weight_files(directory)
    return {
        "architecture": cls.__name__,
        "layers": config.n_layer,
        "width": config.n_embd,
        "attention experts": f"{config.n_att_experts} (top-{config.k_att}), {config.n_head} head(s) of "
                             f"{config.head_size}, K/V {'identity' if config.identity_kv else 'projected'}",
        "mlp experts": f"{config.n_mlp_experts} (top-{config.k_mlp}), {config.n_embd}->{config.ffd_hidden}",
        "vocab": config.vocab_size,
        "parameters": model.num_parameters(),
        "active parameters per token": model.num_parameters(active=True),
        "dtype": config.torch_dtype or "unknown",
        "files": len(files),
        "file size": sum(os.path.getsize(f) for f in files),
    }


def cmd_info(args) -> int:
    info = model_info(args.model)
    for key, value in info.items():
        if key in ("parameters", "active parameters per token"):
            value = f"{value:,} ({_human(value)})"
        elif key == "file size":
            value = f"{value:,} bytes ({_human(value, 'B')})"
        print(f"{key:>28}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molm", description="ModuleFormer / MoLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt (streamed)")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, help="model directory (HF format) or hub id")
    g.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the model's)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)
    i = sub.add_parser("info", help="parameters (total and active per token), experts, layers, dtype, size")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"molm: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
