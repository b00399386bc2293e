"""KV cache: preallocated per-layer buffers [B, S_max, A], one tensor per layer when K = V (MoLM)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class KVCache:
    """Static cache written by position: every write goes through `update` (new K/V at given positions, the first
    S positions read back). The attention layers call `append`, which picks the positions for the step:

    - eager steps (prefill, plain decode): the T new positions follow the `length` cached ones, and S = length + T.
      `length` is a host integer: shapes stay known on the host, so no step needs a device sync. If more positions
      arrive than were reserved, the buffers grow by doubling (a reallocation, never per step).
    - fixed-shape decode steps (inside `fixed_window`, what CUDA graphs replay): the one new position is a device
      tensor and S is the window, so shapes and pointers never change within a window (see molm/engine.py).

    The buffers hold detached copies. When autograd records (grad mode on and the new K/V require grad), `append`
    returns past + new concatenated instead of a buffer view, keeping every appended position in the graph, so
    gradients are the same with the cache as without it; the no-grad decode path stays allocation-free.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        max_length: int,
        width: int,
        shared_kv: bool,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (batch, max(1, max_length), width)
        # zeros, not empty: a fixed-shape decode step reads positions not yet written, masked by a finite bias,
        # which garbage NaN/Inf would turn into NaN
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        values = None if shared_kv else [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self._set_state(keys, values, 0)

    def _set_state(self, keys: list[torch.Tensor], values: list[torch.Tensor] | None, length: int) -> None:
        self.keys, self.values, self.length = keys, values, length
        self._pending = 0  # positions appended in the current step, added to length by advance()
        self._step_positions = None  # (length, end, arange(length, end)) of the current step
        self._tracked: dict[int, tuple] = {}  # layer -> (K, V) of all positions so far, still in the graph
        self.window: int | None = None  # inside fixed_window: the positions attention reads
        self.position: torch.Tensor | None = None  # inside fixed_window: [1] int64, where the new token goes

    @classmethod
    def for_model(cls, model, batch: int, max_length: int) -> "KVCache":
        config = model.config
        param = getattr(model, "transformer", model).wte.weight  # a head's trunk, or a base model itself
        return cls(config.n_layer, batch, max_length, config.att_hidden, config.identity_kv, param.dtype, param.device)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def read_length(self, new: int) -> int:
        """The positions a step of `new` positions attends to (the width of its attention mask)."""
        return self.window if self.window is not None else self.length + new

    @contextmanager
    def fixed_window(self, window: int, position: torch.Tensor):
        """Forwards inside are fixed-shape decode steps for CUDA graphs: the one new token is written at the device
        position `position` ([1] int64) and attention reads the first `window` positions, so the model expects an
        attention_mask of exactly [B, window]; positions not yet written are masked by it (a -inf logit gives
        beta = 0, which changes neither the weights nor the stick-breaking product). `length` is not moved inside (a
        replayed step runs no Python): the caller sets it after the step."""
        if not 0 < window <= self.capacity:
            raise ValueError(f"KVCache.fixed_window: window {window} must be in 1..capacity ({self.capacity})")
        if self.window is not None:
            raise RuntimeError("KVCache.fixed_window: already inside a fixed window")
        self.window, self.position = window, position
        try:
            yield self
        finally:
            self.window = self.position = None

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor | None, positions: torch.Tensor, read: int):
        """The one write path: keys/values [B, T, A] go to cache positions `positions` ([T] int64 on the cache's
        device) of `layer`; returns (K, V) [B, read, A] of the first `read` positions (V is None when K = V)."""
        self.keys[layer].index_copy_(1, positions, keys.detach().to(self.keys[layer].dtype))
        if self.values is not None:
            self.values[layer].index_copy_(1, positions, values.detach().to(self.values[layer].dtype))
        k = self.keys[layer][:, :read]
        return k, (None if self.values is None else self.values[layer][:, :read])

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor | None):
        """keys/values [B, T, A] for the new positions -> (K, V) [B, S, A] (V is None when K = V)."""
        B, T, _ = keys.shape
        self.check_batch(B)
        if self.window is not None:
            if T != 1:
                raise ValueError(f"KVCache.fixed_window takes one new position per step, got {T}")
            self._tracked.pop(layer, None)
            return self.update(layer, keys, values, self.position, self.window)
        positions, end = self.reserve(T)
        k, v = self.update(layer, keys, values, positions, end)
        if torch.is_grad_enabled() and (keys.requires_grad or (values is not None and values.requires_grad)):
            return self._append_tracked(layer, keys, values)
        self._tracked.pop(layer, None)
        return k, v

    def check_batch(self, batch: int) -> None:
        if batch != self.batch:
            raise ValueError(f"KVCache: batch {batch} does not match the cache's batch {self.batch}")

    def reserve(self, new: int) -> tuple[torch.Tensor, int]:
        """The step's `new` positions, made room for (the buffers grow when full) and pending until `advance`:
        -> (positions [new] int64, end = length + new). Every layer of a step writes the same positions."""
        end = self.length + new
        if end > self.capacity:
            self._grow(end)
        self._pending = new
        return self._positions(end), end

    def untrack(self) -> None:
        """Forget the autograd-tracked K/V of earlier steps (a step written without autograd replaces them)."""
        self._tracked.clear()

    def _positions(self, end: int) -> torch.Tensor:
        """The step's new positions length .. end-1, made once per step (every layer writes the same ones)."""
        cached = self._step_positions
        if cached is None or cached[0] != self.length or cached[1] != end:
            self._step_positions = cached = (
                self.length,
                end,
                torch.arange(self.length, end, device=self.keys[0].device),
            )
        return cached[2]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity)

        def grown(buf):
            new = buf.new_zeros(buf.shape[0], capacity, buf.shape[2])
            new[:, : self.length] = buf[:, : self.length]
            return new

        self.keys = [grown(b) for b in self.keys]
        if self.values is not None:
            self.values = [grown(b) for b in self.values]

    def _append_tracked(self, layer: int, keys: torch.Tensor, values: torch.Tensor | None):
        past_k, past_v = self._tracked.get(layer, (None, None))
        if past_k is None or past_k.shape[1] != self.length:  # positions written without a graph: the buffer's
            past_k = self.keys[layer][:, : self.length]
            past_v = None if self.values is None else self.values[layer][:, : self.length]
        k = torch.cat([past_k, keys], dim=1)
        v = None if values is None else torch.cat([past_v, values], dim=1)
        self._tracked[layer] = (k, v)
        return k, v

    def advance(self) -> None:
        """Called once after all layers have appended the same T positions (inside fixed_window: nothing to do)."""
        self.length += self._pending
        self._pending = 0

    def crop(self, length: int) -> None:
        """Keep the first `length` positions and drop the rest (speculative decoding rolls back rejected draft
        tokens). The buffers keep their size: later appends overwrite the dropped positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.crop: length {length} must be between 0 and the cached length {self.length}")
        self.length = length
        self._pending = 0
        self._tracked.clear()  # graph tensors of the dropped positions

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: keep batch rows `index` (index_select on dim 0 of every buffer). The buffers are new
        tensors: fixed-shape steps captured before must be captured again."""
        self.keys = [b.index_select(0, index) for b in self.keys]
        if self.values is not None:
            self.values = [b.index_select(0, index) for b in self.values]
        self._tracked = {
            layer: tuple(None if t is None else t.index_select(0, index) for t in kv)
            for layer, kv in self._tracked.items()
        }

    def to_legacy(self):
        """The original's format: a tuple over layers of (K, V), each [B, S, A] (the same tensor when K = V); the
        positions appended under autograd come back as the graph's tensors."""
        tracked = [self._tracked.get(layer, (None, None)) for layer in range(len(self.keys))]
        if all(k is not None and k.shape[1] == self.length for k, _ in tracked):
            return tuple((k, k if v is None else v) for k, v in tracked)
        keys = [k[:, : self.length] for k in self.keys]
        if self.values is None:
            return tuple((k, k) for k in keys)
        return tuple((k, v[:, : self.length]) for k, v in zip(keys, self.values))

    @classmethod
    def from_legacy(cls, past, shared_kv: bool) -> "KVCache":
        """Build a cache holding the given legacy (K, V) tuple."""
        k0 = past[0][0]
        cache = cls(len(past), k0.shape[0], k0.shape[1], k0.shape[2], shared_kv, k0.dtype, k0.device)
        for layer, (k, v) in enumerate(past):
            cache.append(layer, k, None if shared_kv else v)
        cache.advance()
        return cache


def register_pytree(cls: type) -> None:
    """Make a KVCache class a pytree node (its buffers the leaves), so torch.export / torch.compile can return one
    from a forward. Graph-tracked tensors are not part of it: they only exist while autograd records."""
    from torch.utils import _pytree

    def flatten(cache):
        values = cache.values if cache.values is not None else []
        return list(cache.keys) + list(values), (len(cache.keys), cache.values is not None, cache.length)

    def unflatten(leaves, context):
        n_layer, separate_values, length = context
        cache = cls.__new__(cls)
        leaves = list(leaves)
        cache._set_state(leaves[:n_layer], leaves[n_layer:] if separate_values else None, length)
        return cache

    _pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


register_pytree(KVCache)
