"""Inputs of the stick-breaking attention kernel tests (CUDA, and the CUDA kernels on the CPU emulator)."""

from __future__ import annotations

import torch

FMIN = torch.finfo(torch.float32).min


def sb_inputs(B, T, S, G, H, D, dtype, padded=False, shared_kv=True, shift=0.0, seed=0, device="cpu"):
    """Random q [B, T, G, H, D], k/v [B, S, H, D] in dtype (v is k when shared_kv) and a bias [B, S] (None unless
    padded or shifted): every logit shifted by `shift`; padded: left padding of half of batch 0 and of the first
    three keys of the last batch element (dtype-min, as the model pads)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, G, H, D, generator=g, device=device)
    k = torch.randn(B, S, H, D, generator=g, device=device)
    v = k if shared_kv else torch.randn(B, S, H, D, generator=g, device=device)
    bias = None
    if padded or shift:
        bias = torch.full((B, S), shift, device=device)
    if padded:
        bias[0, : S // 2] = FMIN
        bias[-1, : min(S - 1, 3)] = FMIN
    return q.to(dtype), k.to(dtype), v.to(dtype), bias
