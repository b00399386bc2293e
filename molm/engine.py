"""Fixed-shape decode steps for CUDA graphs.

A decode step reads the first `window` cache positions (powers of two, so at most 2x the live context) and
writes the new token at a device-side position, so its shapes and pointers never change within a window: it is
captured once per window as a CUDA graph and replayed every step (no Python, no allocations, no host syncs). The
same code runs eagerly (`cuda_graphs=False`), which is how the CPU tests check its math against the plain path.
"""

from __future__ import annotations

import torch

from .cache import KVCache


class StaticDecoder:
    def __init__(self, model, cache: KVCache, mask: torch.Tensor, cuda_graphs: bool, min_window: int = 64):
        """mask [B, capacity] int64 (1 = attend), owned by the caller: it sets mask[:, position] = 1 before each
        step and keeps positions not yet written at 0."""
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device, got {model.device}")
        self.model, self.cache, self.mask, self.cuda_graphs = model, cache, mask, cuda_graphs
        self.min_window = min_window
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=model.device)
        self.position = torch.zeros(1, dtype=torch.long, device=model.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # one memory pool shared by all windows' graphs

    def window(self, position: int) -> int:
        window = self.min_window
        while window <= position:
            window *= 2
        return min(window, self.cache.capacity)

    def _forward(self, window: int) -> torch.Tensor:
        with self.cache.fixed_window(window, self.position):
            out = self.model(
                self.tokens,
                attention_mask=self.mask[:, :window],
                past_key_values=self.cache,
                use_cache=True,
                return_aux_loss=False,
                logits_to_keep=1,
            )
        return out.logits[:, -1]  # [B, V] float32

    def _capture(self, window: int):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy init, allocator); rewrites the same slot
            self._forward(window)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(window)
        self.pool = graph.pool()
        return graph, logits

    def step(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """tokens [B] at cache position `position` -> next-token logits [B, V] (valid until the next step)."""
        if position >= self.cache.capacity:
            raise ValueError(f"position {position} is past the cache capacity {self.cache.capacity}")
        self.tokens.copy_(tokens.view(-1, 1))
        self.position.fill_(position)
        window = self.window(position)
        if not self.cuda_graphs:
            logits = self._forward(window)
        else:
            if window not in self.graphs:
                self.graphs[window] = self._capture(window)
            graph, logits = self.graphs[window]
            graph.replay()
        self.cache.length = position + 1  # on the host: a replayed step moves no Python state
        return logits
