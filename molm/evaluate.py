"""Evaluation: token log-likelihoods, and the perplexities built on them: of a text (strided windows, the harness'
metric definitions) and of a token stream (consecutive windows, the training loop's eval perplexity).

Perplexity follows lm-evaluation-harness' wikitext task: the document is scored token by token (the first token
conditioned on the eot token), then

    word_perplexity = exp(-loglik / words)   words = len(re.split(r"\\s+", text))
    byte_perplexity = exp(-loglik / bytes)   bytes = len(text.encode("utf-8"))
    bits_per_byte   = -loglik / bytes / ln 2

With stride == max_length the windows are exactly the harness' disjoint rolling windows (context_len 1), so the
numbers equal `lm_eval --tasks wikitext`-style loglikelihood_rolling; a smaller stride gives every scored token
more context (max_length - stride tokens at least) at the cost of more forward passes.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .data import token_windows
from .generate import check_tokenizer_fits
from .tokenizer import eot_id  # noqa: F401  (molm.evaluate.eot_id, lm_eval)


def default_max_length(model) -> int:
    """history_length + block_size: the context MoLM was trained on (1024)."""
    return model.config.max_position_embeddings


@torch.inference_mode()
def token_logprobs(
    model,
    inputs: list[list[int]] | torch.Tensor,
    targets: list[list[int]] | torch.Tensor,
    batch_size: int = 8,
    progress=None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each row: log p(target_j | inputs up to the position that predicts it), the targets being the tokens
    that follow the last len(target) inputs (targets = (inputs + next)[-len(target):]), and whether each target is
    the argmax. Rows are right-padded into batches (causal attention: padding after a token never reaches it).

    Returns a list of (logprobs [n] float64, is_greedy [n] bool) in the order of `inputs`.
    """
    if len(inputs) != len(targets):
        raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) must pair up")
    results: list = [None] * len(inputs)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))  # similar lengths share a batch
    device = model.device
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(inputs[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            if not 0 < len(targets[i]) <= len(inputs[i]):
                raise ValueError(
                    f"row {i}: need 1 <= len(target) <= len(input), got {len(targets[i])} targets "
                    f"for {len(inputs[i])} inputs"
                )
            ids[r, : len(inputs[i])] = torch.as_tensor(inputs[i])
        logits = model(ids.to(device), return_aux_loss=False).logits  # [B, T, V] float32
        for r, i in enumerate(rows):
            n, end = len(targets[i]), len(inputs[i])
            want = torch.as_tensor(targets[i], device=device)
            rows_lp = F.log_softmax(logits[r, end - n : end].double(), dim=-1)  # [n, V]: one row at a time in float64
            results[i] = (rows_lp.gather(1, want[:, None])[:, 0].cpu(), (rows_lp.argmax(-1) == want).cpu())
        if progress is not None:
            progress.update(len(rows))
    return results


def perplexity_of_stream(
    model, tokens, seq_len: int = 128, batch_size: int = 16, max_batches: int | None = None, tokenizer=None
) -> float:
    """exp(mean next-token cross entropy) over consecutive non-overlapping windows of seq_len tokens of `tokens` (a
    tensor, token file or text file, see molm.data.load_tokens), each window predicting its own last seq_len - 1
    tokens; aux losses excluded. At most max_batches batches of batch_size windows. This is `molm.perplexity` and
    the training loop's eval perplexity."""
    windows = token_windows(
        tokens,
        tokenizer,
        seq_len,
        model.config.vocab_size,
        "evaluation data",
        None if max_batches is None else max_batches * batch_size,
    )
    was_training = model.training
    model.eval()
    try:
        scored = token_logprobs(model, windows[:, :-1], windows[:, 1:], batch_size)
    finally:
        model.train(was_training)
    return math.exp(-float(sum(lp.sum() for lp, _ in scored)) / windows[:, 1:].numel())


def strided_windows(ids: list[int], prefix: int, max_length: int, stride: int):
    """Split the prediction of every token of `ids` (the first conditioned on `prefix`) into windows.

    Yields (inputs, targets): inputs hold at most max_length tokens; the targets are the last len(targets)
    predictions of that window; across all windows every token is predicted exactly once.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    seq = [prefix] + list(ids)  # seq[k] predicts seq[k + 1]
    done = 0  # tokens of ids predicted so far
    end = min(max_length, len(ids))  # the window predicts ids[:end] (the first one all of them)
    while done < len(ids):
        start = max(0, end - max_length)
        yield seq[start:end], ids[done:end]
        done = end
        end = min(end + stride, len(ids))


@dataclass
class Perplexity:
    loglikelihood: float  # natural log, summed over all tokens
    tokens: int
    words: int
    bytes: int
    windows: int
    max_length: int
    stride: int

    @property
    def token_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / self.bytes / math.log(2)

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "token_perplexity": self.token_perplexity,
            "word_perplexity": self.word_perplexity,
            "byte_perplexity": self.byte_perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def count_words(text: str) -> int:
    """Words as the harness' wikitext task counts them (whitespace splits of the original text)."""
    return len(re.split(r"\s+", text))


def perplexity(
    model,
    tokenizer,
    text: str,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> Perplexity:
    """Perplexity of `text` under `model`, in strided windows of max_length tokens (default: the model's
    history_length + block_size) moving by `stride` (default: max_length, the harness' definition)."""
    if not isinstance(text, str) or not text:
        raise ValueError("perplexity needs a non-empty text")
    max_length = max_length or default_max_length(model)
    stride = stride or max_length
    ids = tokenizer.encode(text).ids
    if not ids:
        raise ValueError("the text encodes to no tokens")
    check_tokenizer_fits(ids, model.config.vocab_size, "the text")
    windows = list(strided_windows(ids, eot_id(model, tokenizer), max_length, stride))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(windows), desc="perplexity", unit="window")
    try:
        scored = token_logprobs(model, [w[0] for w in windows], [w[1] for w in windows], batch_size, bar)
    finally:
        if bar is not None:
            bar.close()
    loglik = float(sum(lp.sum() for lp, _ in scored))
    return Perplexity(loglik, len(ids), count_words(text), len(text.encode("utf-8")), len(windows), max_length, stride)
