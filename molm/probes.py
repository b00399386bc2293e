"""RouterProbes: forward hooks that record what every Router decided during a forward pass (for the load
concentration loss and expert usage statistics)."""

from __future__ import annotations

from functools import partial

from .modules import Router


class RouterProbes:
    """Forward hooks on every Router: keep each call's Routing (probs [N, E], experts [N, k]) for extra losses
    and usage statistics. Use as a context manager; `routings` holds (router name, Routing) in call order."""

    def __init__(self, model):
        self.routers = [(name, m) for name, m in model.named_modules() if isinstance(m, Router)]
        self.routings: list = []
        self._handles = []

    def __enter__(self):
        self._handles = [m.register_forward_hook(partial(self._hook, name)) for name, m in self.routers]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name, module, inputs, output):
        self.routings.append((name, output[0]))
