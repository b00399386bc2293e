"""Token streams for training, evaluation and usage statistics: text or token files to one int64 stream, random
or consecutive windows of it, and the checks that the stream fits the model."""

from __future__ import annotations

import os

import numpy as np
import torch

from .tokenizer import load_tokenizer


# --- data --------------------------------------------------------------------------------------------------------
def load_tokens(data, tokenizer=None) -> torch.Tensor:
    """A 1-D int64 token stream from a tensor / array, a token file (.npy; .bin = raw uint16 as in nanoGPT), or text
    files (anything else; encoded with `tokenizer`, files joined by its eos/bos-free concatenation). `data` may be
    a list of these."""
    if isinstance(data, torch.Tensor):
        return data.reshape(-1).long()
    if isinstance(data, np.ndarray):
        return torch.from_numpy(data.astype(np.int64).reshape(-1))
    if isinstance(data, (list, tuple)):
        parts = [load_tokens(d, tokenizer) for d in data]
        if not parts:
            raise ValueError("no training data given")
        return torch.cat(parts)
    path = os.fspath(data)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if path.endswith(".npy"):
        return load_tokens(np.load(path), tokenizer)
    if path.endswith(".bin"):
        return load_tokens(np.fromfile(path, dtype=np.uint16), tokenizer)
    if tokenizer is None:
        raise ValueError(
            f"{path} is a text file: pass a tokenizer (a tokenizers.Tokenizer or a directory with "
            "tokenizer.json) to encode it"
        )
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines(keepends=True)
    chunks = ["".join(lines[i : i + 2000]) for i in range(0, len(lines), 2000)]
    ids = [i for enc in tokenizer.encode_batch(chunks) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)


def as_tokenizer(tokenizer):
    """A tokenizers.Tokenizer, or the one saved in a directory (or its tokenizer.json path)."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = os.fspath(tokenizer)
    return load_tokenizer(os.path.dirname(path) if path.endswith(".json") else path)


def batch_windows(tokens: torch.Tensor, seq_len: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows [batch, seq_len] of the stream."""
    starts = torch.randint(0, len(tokens) - seq_len + 1, (batch,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def check_tokens(tokens: torch.Tensor, seq_len: int, vocab_size: int, what: str) -> None:
    if len(tokens) < seq_len:
        raise ValueError(f"{what} has {len(tokens)} tokens, fewer than seq_len={seq_len}")
    hi = int(tokens.max())
    if int(tokens.min()) < 0 or hi >= vocab_size:
        raise ValueError(
            f"{what} holds token id {hi} outside the model's vocab_size {vocab_size}: "
            "was it encoded with another tokenizer?"
        )


def token_windows(data, tokenizer, seq_len: int, vocab_size: int, what: str, max_windows: int | None = None):
    """Consecutive non-overlapping windows [n, seq_len] of the tokens of `data` (see load_tokens)."""
    tokens = load_tokens(data, as_tokenizer(tokenizer))
    check_tokens(tokens, seq_len, vocab_size, what)
    n = len(tokens) // seq_len
    windows = tokens[: n * seq_len].view(n, seq_len)
    return windows if max_windows is None else windows[:max_windows]
