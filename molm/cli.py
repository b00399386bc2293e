"""The `molm` command: argparse and printing only."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

import torch

from .config import DTYPE_NAMES

# A small MoE model trained on Shakespeare, the King James Bible and Jane Austen (experiments/train_default.py),
# shipped so `molm generate` works as is.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")
# Backslash escapes understood in --stop, so that `--stop "\n\n"` means two newlines as users expect.
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


class UsageError(Exception):
    """A problem with what the user asked for (a flag, a file, the machine): reported as one line, no traceback."""


def unescape(text: str) -> str:
    """\\n, \\t, \\r and \\\\ become newline, tab, carriage return and a backslash; anything else stays as typed."""
    return re.sub(r"\\([ntr\\])", lambda m: ESCAPES[m.group(1)], text)


def check_device(device: str, allow_auto: bool = False) -> None:
    """A device torch can use here; asking for CUDA on a CPU-only torch or machine is a usage error, not a crash."""
    if device == "auto" and allow_auto:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device (try cpu, cuda or cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = (
            "this torch was built without CUDA"
            if torch.version.cuda is None
            else "no CUDA GPU is visible to this torch"
        )
        raise UsageError(f"--device {device}: CUDA is not available ({why}); use --device cpu")


def check_at_least(args, minimums: dict[str, float]) -> None:
    """Numeric flags with a lower bound, checked (and named as typed) before anything is loaded."""
    for dest, lowest in minimums.items():
        value = getattr(args, dest)
        if value is not None and value < lowest:
            raise UsageError(f"--{dest.replace('_', '-')} must be >= {lowest}, got {value}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="auto", help="weights dtype (auto = as stored)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--backend",
        choices=["extension", "reference"],
        default=None,
        help="ops backend (default: extension when built)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="quantize the experts and lm_head to int8 after loading (half the bytes of bf16 per step)",
    )


# What `molm generate` does without sampling flags: sample as local LLM tools do, from a fixed seed so that a run
# repeats. The Python API (molm.generate) stays greedy by default.
GENERATE_DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1, "seed": 0}


def _check_generate_flags(args) -> None:
    """Validate with the flag names before anything is loaded or printed; fill in the sampling defaults."""
    check_at_least(args, {"max_new_tokens": 0, "temperature": 0, "top_k": 1, "no_repeat_ngram_size": 0})
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise UsageError(f"--repetition-penalty must be > 0 (1 = off), got {args.repetition_penalty:g}")
    if args.greedy and args.temperature not in (None, 0):
        raise UsageError(
            f"--greedy and --temperature {args.temperature:g} contradict each other: --greedy means --temperature 0"
        )
    if args.interactive and args.prompt is not None:
        raise UsageError("-i reads the prompts from stdin, one a line: drop the prompt argument")
    if not args.interactive and not args.prompt:
        raise UsageError("the prompt is empty: give some text to continue (or -i to read prompts from stdin)")
    check_device(args.device)
    greedy = args.greedy or args.temperature == 0
    if greedy and (args.top_k is not None or args.top_p is not None):
        warnings.warn("--top-k / --top-p have no effect with --greedy / --temperature 0")
    args.temperature = 0.0 if greedy else args.temperature
    for name, default in GENERATE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def cmd_generate(args) -> int:
    import molm

    _check_generate_flags(args)
    model = molm.load(
        args.model or DEFAULT_MODEL,
        dtype=DTYPE_NAMES[args.dtype],
        device=args.device,
        backend=args.backend,
        progress=sys.stderr.isatty(),
        quantize=args.quantize,
    )
    tokenizer = molm.load_tokenizer(args.tokenizer or model.name_or_path)
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        stop=[unescape(s) for s in args.stop or []],
        tokenizer=tokenizer,
        stream=True,
    )
    if args.interactive:
        return _interactive(model, settings)
    pieces = molm.generate(model, args.prompt, **settings)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    return 0 if _stream(pieces) else 130  # 130: stopped by Ctrl-C


def _stream(pieces) -> bool:
    """Print the pieces as they come and end the line; False when Ctrl-C cut the generation short."""
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        return False
    sys.stdout.write("\n")
    sys.stdout.flush()  # here, where a closed pipe is handled, not at interpreter exit
    return True


def _read_prompt(terminal: bool) -> str | None:
    """The next line of stdin (None at end of input). On a terminal: a "> " marker and line editing."""
    if terminal:
        try:
            return input("> ")
        except EOFError:
            sys.stdout.write("\n")
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _interactive(model, settings) -> int:
    """Prompts from stdin, one a line, until end of input (Ctrl-D). Ctrl-C stops the current generation only.

    The n-th prompt (counting from 0) samples from seed + n: the same input gives the same session, and a prompt
    typed again gets a fresh continuation. On a terminal the typed prompt is not printed again; from a pipe each
    output starts with its prompt.
    """
    import molm

    terminal = sys.stdin.isatty()
    if terminal:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    first_seed, count = settings.pop("seed"), 0
    while True:
        try:
            prompt = _read_prompt(terminal)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as shells do
            sys.stdout.write("\n")
            continue
        if prompt is None:
            return 0
        if not prompt.strip():
            continue
        try:
            pieces = molm.generate(model, prompt, seed=first_seed + count, **settings)
        except ValueError as exc:  # e.g. a prompt the tokenizer cannot encode: report it, keep going
            print(f"molm: error: {' '.join(str(exc).split())}", file=sys.stderr)
            continue
        count += 1
        if not terminal:
            sys.stdout.write(prompt)
        _stream(pieces)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.2f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.2f}P{unit}"


def model_info(path) -> dict:
    """Sizes of a checkpoint directory without reading its weights (the model is built on the meta device)."""
    from .checkpoint import check_weight_file, resolve, weight_files
    from .config import ModuleFormerConfig
    from .loading import model_class

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
        "quantization": (
            f"{config.quantization.get('method')} experts and lm_head, one scale per output channel"
            if config.quantization
            else "none"
        ),
        "files": len(files),
        "file size": sum(os.path.getsize(f) for f in files),
        "integrity": "; ".join(f"{os.path.basename(f)}: {problem}" for f in files if (problem := check_weight_file(f)))
        or "ok",
    }


def cmd_info(args) -> int:
    info = model_info(args.model)
    for key, value in info.items():
        if key in ("parameters", "active parameters per token"):
            value = f"{value:,} ({_human(value)})"
        elif key == "file size":
            value = f"{value:,} bytes ({_human(value, 'B')})"
        print(f"{key:>28}: {value}")
    if info["integrity"] != "ok":
        print(f"molm: error: {args.model} is damaged: {info['integrity']}", file=sys.stderr)
        return 1
    return 0


def cmd_quantize(args) -> int:
    import molm

    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise UsageError("OUT must be a new directory, not the model being quantized")
    model = molm.load(args.model, quantize=args.method, progress=sys.stderr.isatty())
    model.save_pretrained(args.out)
    before, after = model_info(args.model)["file size"], model_info(args.out)["file size"]
    print(f"quantized {args.model} ({args.method}): {_human(before, 'B')} -> {_human(after, 'B')}, saved to {args.out}")
    return 0


def cmd_train(args) -> int:
    import molm
    from molm.train import TrainConfig

    check_device(args.device, allow_auto=True)
    check_at_least(
        args,
        {
            "steps": 1,
            "seq_len": 2,
            "batch_size": 1,
            "grad_accum": 1,
            "lr": 0,
            "warmup": 0,
            "weight_decay": 0,
            "eval_every": 0,
            "save_every": 0,
            "new_att_experts": 0,
            "new_mlp_experts": 0,
        },
    )
    if (args.model is None) == (args.config is None):
        raise UsageError(
            "molm train needs exactly one of --model DIR (finetune) or --config config.json (from scratch)"
        )
    model = molm.ModuleFormerConfig.from_pretrained(args.config) if args.config else args.model
    if args.new_att_experts or args.new_mlp_experts:
        base = molm.load(args.model, dtype=torch.float32) if args.model else model
        model = molm.extend(base, args.new_att_experts, args.new_mlp_experts, freeze_old=args.freeze_old)
    fields = {
        f: getattr(args, f)
        for f in (
            "steps",
            "seq_len",
            "batch_size",
            "grad_accum",
            "lr",
            "warmup",
            "weight_decay",
            "precision",
            "aux_loss_weight",
            "sample_topk",
            "concentration_weight",
            "eval_every",
            "save_every",
            "seed",
            "device",
        )
    }
    result = molm.train(
        model,
        args.data,
        out_dir=args.out,
        eval_data=args.eval_data,
        tokenizer=args.tokenizer or args.model,
        config=TrainConfig(**fields),
        resume=args.resume,
    )
    last = result.history[-1]
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 evaluates and saves
        print(
            f"trained {last['step']} steps: train cross entropy {last['ce']:.4f}"
            + (f", eval perplexity {last['eval_ppl']:.2f}" if "eval_ppl" in last else "")
            + f"; saved to {args.out}"
        )
    return 0


def cmd_usage(args) -> int:
    import json

    import molm

    model = molm.load(args.model, dtype=torch.float32, backend=args.backend)
    usage = molm.expert_usage(
        model,
        args.data,
        seq_len=args.seq_len,
        max_batches=args.max_batches,
        tokenizer=args.tokenizer or model.name_or_path,
    )
    print(f"selection frequency per layer over {usage.tokens:,} tokens (each row sums to k)")
    for kind in ("att", "mlp"):
        freq = usage.site(kind)[0]
        print(f"{kind} experts " + " ".join(f"{e:>5}" for e in range(freq.shape[1])))
        for layer, row in enumerate(freq.tolist()):
            print(f"  layer {layer:>3} " + " ".join(f"{v:5.3f}" for v in row))
    if args.png:
        molm.plot_usage(usage, args.png, title=os.path.basename(os.path.normpath(args.model)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(usage.to_dict(), f)
    return 0


TRAIN_HELP = {"warmup": "linear warmup steps (default: 50, or 10%% of --steps when that is fewer)"}


def _add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train or finetune a causal LM on text or token files (torchrun for DDP)")
    t.add_argument("data", nargs="+", help="text files (encoded with the tokenizer), .npy or uint16 .bin tokens")
    t.add_argument("--out", required=True, help="output directory (checkpoint, trainer state, log, loss.png)")
    t.add_argument("--model", default=None, help="checkpoint to finetune")
    t.add_argument("--config", default=None, help="config.json of a model to train from scratch")
    t.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the model's)")
    t.add_argument("--eval-data", nargs="+", default=None)
    t.add_argument("--resume", action="store_true", help="continue from --out's trainer_state.pt")
    t.add_argument("--new-att-experts", type=int, default=0, help="append attention experts (molm.extend)")
    t.add_argument("--new-mlp-experts", type=int, default=0, help="append MLP experts (molm.extend)")
    t.add_argument("--freeze-old", action="store_true", help="with --new-*-experts: train only the new experts")
    for name, typ, default in (
        ("steps", int, 1000),
        ("seq-len", int, 128),
        ("batch-size", int, 16),
        ("grad-accum", int, 1),
        ("lr", float, 1e-3),
        ("warmup", int, None),
        ("weight-decay", float, 0.1),
        ("aux-loss-weight", float, None),
        ("sample-topk", int, None),
        ("concentration-weight", float, 0.0),
        ("eval-every", int, 100),
        ("save-every", int, 0),
        ("seed", int, 0),
    ):
        t.add_argument(f"--{name}", type=typ, default=default, help=TRAIN_HELP.get(name))
    t.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    t.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    t.set_defaults(func=cmd_train)
    u = sub.add_parser("usage", help="expert selection frequency per layer on some data (table, PNG heat map)")
    u.add_argument("model")
    u.add_argument("data", nargs="+")
    u.add_argument("--tokenizer", default=None)
    u.add_argument("--seq-len", type=int, default=128)
    u.add_argument("--max-batches", type=int, default=None)
    u.add_argument("--png", default=None, help="write the heat map here")
    u.add_argument("--json", default=None, help="write the statistics here")
    u.add_argument("--backend", choices=["extension", "reference"], default=None)
    u.set_defaults(func=cmd_usage)


def cmd_eval(args) -> int:
    import json

    if (args.perplexity is None) == (args.tasks is None):
        raise UsageError("molm eval needs exactly one of --perplexity FILE or --tasks NAMES")
    check_device(args.device)
    check_at_least(args, {"max_length": 2, "stride": 1, "batch_size": 1, "num_fewshot": 0, "limit": 0})
    if args.perplexity:
        import molm
        from molm.evaluate import perplexity

        with open(args.perplexity, encoding="utf-8") as f:
            text = f.read()
        model = molm.load(
            args.model, dtype=DTYPE_NAMES[args.dtype], device=args.device, backend=args.backend, quantize=args.quantize
        )
        result = perplexity(
            model,
            molm.load_tokenizer(args.tokenizer or model.name_or_path),
            text,
            max_length=args.max_length,
            stride=args.stride,
            batch_size=args.batch_size,
        )
        report = result.as_dict()
        for key in (
            "tokens",
            "words",
            "bytes",
            "windows",
            "max_length",
            "stride",
            "token_perplexity",
            "word_perplexity",
            "byte_perplexity",
            "bits_per_byte",
        ):
            value = report[key]
            print(f"{key:>16}: {value:.4f}" if isinstance(value, float) else f"{key:>16}: {value}")
    else:
        try:
            from molm.lm_eval import run_tasks
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] != "lm_eval":
                raise
            raise UsageError(
                "molm eval --tasks needs lm-evaluation-harness, which is not installed: pip install 'molm[eval]'"
            ) from exc
        report = run_tasks(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
    return 0


def _add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity of a text file, or lm-evaluation-harness tasks (molm[eval])")
    e.add_argument("--model", required=True, help="model directory (HF format) or hub id")
    e.add_argument(
        "--perplexity",
        default=None,
        metavar="FILE",
        help="text file: word/byte perplexity as the harness' wikitext task defines them",
    )
    e.add_argument("--tasks", default=None, help="comma-separated harness tasks (molm's local ones: molm_local)")
    e.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the model's)")
    e.add_argument("--max-length", type=int, default=None, help="window length (default: history + block size)")
    e.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: max length)")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    e.add_argument("--include-path", default=None, help="more task YAML directories")
    e.add_argument("--json", default=None, help="write the results here")
    _add_model_args(e)
    e.set_defaults(func=cmd_eval)


def cmd_serve(args) -> int:
    check_at_least(args, {"port": 0, "max_batch": 1, "max_queue": 1, "prefill_tokens": 1, "shutdown_timeout": 0})
    if args.port > 65535:
        raise UsageError(f"--port must be <= 65535, got {args.port}")
    check_device(args.device)
    try:
        import fastapi  # noqa: F401  (molm[serve])
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"molm serve needs fastapi, uvicorn and prometheus-client: pip install 'molm[serve]' ({exc})"
        ) from None
    from molm.serve import serve

    return serve(
        args.model or DEFAULT_MODEL,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_tokens=args.prefill_tokens,
        dtype=DTYPE_NAMES[args.dtype],
        device=args.device,
        backend=args.backend,
        quantize=args.quantize,
        shutdown_timeout=args.shutdown_timeout,
        model_name=args.model_name or (None if args.model else "molm-default"),
    )


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible completions server with continuous batching (molm[serve])")
    s.add_argument("--model", default=None, help="model directory (default: the embedded small model)")
    s.add_argument("--model-name", default=None, help="the model id clients send (default: the directory name)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0: any free port (printed at startup)")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    s.add_argument("--max-queue", type=int, default=256, help="waiting sequences; beyond it requests get 429")
    s.add_argument(
        "--prefill-tokens", type=int, default=64, help="prompt tokens prefilled per scheduler step (batch x length)"
    )
    s.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish after SIGTERM"
    )
    _add_model_args(s)
    s.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="molm", description="ModuleFormer / MoLM: generate, inspect, evaluate, train, analyse expert usage"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "generate",
        help="generate text from a prompt (streamed)",
        description="Continue a prompt. By default molm samples (temperature {temperature}, "
        "top-p {top_p}, repetition penalty {repetition_penalty}) from seed {seed}, so a run repeats; "
        "--greedy picks the most likely token instead.".format(**GENERATE_DEFAULTS),
    )
    g.add_argument("prompt", nargs="?", default=None, help="text to continue (with -i: none, read from stdin)")
    g.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="read prompts from stdin, one a line, until "
        "end of input (Ctrl-D); Ctrl-C stops the current generation only",
    )
    g.add_argument(
        "--model",
        default=None,
        help="model directory (HF format) or hub id (default: the embedded small model)",
    )
    g.add_argument("--tokenizer", default=None, help="directory with tokenizer.json (default: the model's)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument(
        "--greedy",
        action="store_true",
        help="always pick the most likely token (same as "
        "--temperature 0; the repetition penalty still applies, --repetition-penalty 1 turns it off)",
    )
    g.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"sampling temperature (default: {GENERATE_DEFAULTS['temperature']}; 0 = greedy)",
    )
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: all)")
    g.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="sample from the smallest set of tokens with "
        f"probability >= p (nucleus; default: {GENERATE_DEFAULTS['top_p']})",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="divide the positive logits (multiply "
        "the negative ones) of every token already in the text by this (default: "
        f"{GENERATE_DEFAULTS['repetition_penalty']}; 1 = off)",
    )
    g.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        help="never repeat an n-gram of this many tokens (default: 0 = off)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"sampling seed (default: {GENERATE_DEFAULTS['seed']}, so the same command gives the same text)",
    )
    g.add_argument(
        "--stop",
        action="append",
        default=None,
        help="stop string (repeatable); \\n, \\t, \\r and "
        "\\\\ are read as newline, tab, carriage return and backslash, so --stop '\\n\\n' stops at a "
        "blank line",
    )
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)
    i = sub.add_parser("info", help="parameters (total and active per token), experts, layers, dtype, size")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)
    q = sub.add_parser("quantize", help="write an int8 copy of a model (experts and lm_head; loads back as int8)")
    q.add_argument("model")
    q.add_argument("out")
    q.add_argument("--method", choices=["int8"], default="int8")
    q.set_defaults(func=cmd_quantize)
    _add_eval_parser(sub)
    _add_train_parser(sub)
    _add_serve_parser(sub)
    for command in sub.choices.values():  # `molm generate --debug ...` too; SUPPRESS keeps `molm --debug ...`
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback of every error"
        )
    return parser


# Errors that mean "the input or the machine is not as required": one line. Anything else is a bug and keeps its
# traceback. ValueError covers molm's validation errors and CheckpointError.
USER_ERRORS = (
    UsageError,
    ValueError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    torch.OutOfMemoryError,
)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"molm: warning: {message}\n"


def _stdout_gone() -> int:
    """The reader of stdout went away (`molm generate ... | head`): stop quietly, as Unix tools do."""
    try:  # the interpreter flushes stdout at exit: point it at /dev/null so that flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE: what a shell reports for a tool ended by a closed pipe


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    show_warning = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _stdout_gone()
    except USER_ERRORS as exc:
        if debug:
            raise
        message = str(exc) if str(exc) else type(exc).__name__
        print(f"molm: error: {' '.join(message.split())}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = show_warning


if __name__ == "__main__":
    sys.exit(main())
