"""lm-evaluation-harness glue (optional extra `molm[eval]`): the `molm` model type and a harness CLI that knows it.

    python -m molm.lm_eval --model molm --model_args pretrained=DIR,dtype=float32 --tasks molm_local \\
        --include_path "$(python -c 'import molm.tasks, os; print(os.path.dirname(molm.tasks.__file__))')"

lm_eval 0.4 has no plugin entry points for models: importing this module registers `molm` with its registry, and
`python -m molm.lm_eval` is lm_eval's own command line after that import (`molm eval --tasks` wraps it too). The
harness' own model types stay available; `--model hf` reads ModuleFormer directories there as well.
"""

from __future__ import annotations

import os
import sys
import warnings

import lm_eval.models  # noqa: F401  (lm_eval fills its built-in model table only while the registry is empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .config import DTYPE_NAMES
from .evaluate import default_max_length, eot_id, strided_windows, token_logprobs

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


@register_model("molm")
class MolmLM(TemplateLM):
    """model_args: pretrained (directory or hub id), dtype (auto|float32|bfloat16|float16, default float32),
    device, backend (extension|reference), batch_size, max_length (default history_length + block_size),
    tokenizer (a directory with tokenizer.json; default the model's, or the offline MoLM tokenizer)."""

    def __init__(
        self,
        pretrained: str,
        dtype: str = "float32",
        device: str | None = "cpu",
        backend: str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        tokenizer: str | None = None,
        **ignored,
    ):
        super().__init__()
        import molm

        device = device or "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line passes device=cuda unless told otherwise
            warnings.warn(f"device {device!r} asked for but CUDA is not available: evaluating on the CPU")
            device = "cpu"
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
        self.model = molm.load(pretrained, dtype=DTYPE_NAMES[dtype], device=device, backend=backend)
        self.tokenizer = molm.load_tokenizer(tokenizer or self.model.name_or_path)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> a fixed size
        self.max_length = int(max_length) if max_length else default_max_length(self.model)
        self._device = torch.device(device)

    @property
    def eot_token_id(self) -> int:
        return eot_id(self.model, self.tokenizer)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string).ids  # GPT-2 BPE adds no special tokens

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        inputs, targets = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("loglikelihood: the continuation encodes to no tokens")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"loglikelihood: continuation of {len(continuation)} tokens exceeds max_length {self.max_length}"
                )
            inputs.append((context + continuation)[-(self.max_length + 1) : -1])
            targets.append(continuation)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        scored = token_logprobs(self.model, inputs, targets, self.batch_size, bar)
        bar.close()
        return [(float(lp.sum()), bool(greedy.all())) for lp, greedy in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The harness' rolling windows (disjoint, max_length tokens each), one document at a time."""
        results = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            ids = self.tok_encode(request.args[0])
            if not ids:
                results.append(0.0)
                continue
            windows = list(strided_windows(ids, self.eot_token_id, self.max_length, self.max_length))
            scored = token_logprobs(self.model, [w[0] for w in windows], [w[1] for w in windows], self.batch_size)
            results.append(float(sum(lp.sum() for lp, _ in scored)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        import molm

        results = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, settings = request.args
            settings = dict(settings or {})
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(settings.pop("max_gen_toks", settings.pop("max_new_tokens", 256)))
            temperature = float(settings.pop("temperature", 0.0)) if settings.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new) :] or [self.eot_token_id]
            steps = molm.generate(
                self.model,
                torch.tensor([ids]),
                max_new_tokens=max_new,
                temperature=temperature,
                top_k=settings.pop("top_k", None),
                top_p=settings.pop("top_p", None),
                seed=settings.pop("seed", None),
                stream=True,
            )
            new: list[int] = []  # molm.generate itself stops at the model's eos
            text = ""
            for next_ids in steps:
                new.append(int(next_ids[0]))
                text = self.tok_decode(new)
                if any(s in text for s in until):
                    break
            cut = min((text.find(s) for s in until if s and s in text), default=-1)
            results.append(text[:cut] if cut >= 0 else text)
        return results


def run_tasks(args) -> dict:
    """`molm eval --tasks`: run harness tasks (molm's local ones always findable) and print the harness' table."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    include = [TASKS_DIR] + ([args.include_path] if args.include_path else [])
    lm = MolmLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
        batch_size=args.batch_size,
        max_length=args.max_length,
        tokenizer=args.tokenizer,
    )
    limit = args.limit if args.limit is None or args.limit < 1 else int(args.limit)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[t for t in args.tasks.split(",") if t],
        num_fewshot=args.num_fewshot,
        limit=limit,
        task_manager=TaskManager(include_path=include),
        log_samples=False,
    )
    if results is None:
        raise RuntimeError("lm_eval returned no results")
    print(make_table(results))
    return results["results"]


def main(argv: list[str] | None = None) -> None:
    """lm_eval's own command line, with `molm` registered, and with ModuleFormer registered with transformers'
    Auto classes when transformers is installed (so `--model hf --model_args pretrained=DIR` reads molm
    directories too)."""
    from lm_eval.__main__ import cli_evaluate

    try:
        import molm.hf  # noqa: F401
    except ImportError:
        pass

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
