"""Decode-step engines: fixed-shape steps for CUDA graphs (StaticDecoder) and eager steps from a plan read once per
generation (DecodePlan).

A fixed-shape decode step reads the first `window` cache positions (powers of two, so at most 2x the live context) and
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


class DecodePlan:
    """Eager decode steps without the per-step module walk, for one generation.

    A model forward checks on every call that each block may take its direct path (no hooks, no wrappers, no patched
    forwards, eval mode: `Block.direct_ready`) and reads every weight through its module: with 24 blocks that is
    about 500 module lookups per step, and after a step's weights have streamed through the caches each one misses
    them (about 1 ms of a 24 ms MoLM-350M-4B bf16 step on 2 CPU cores). A plan does those checks and reads once,
    when generation starts, then runs each step as the same ops on the same tensors in the same order as the
    model's direct path, so its logits are bitwise the model's. Like a captured CUDA graph, it keeps what it read:
    hooks, module swaps or new parameter tensors set while a generation runs apply from the next generation on.
    `capture` returns None where any module is not exactly molm's or torch's own, unhooked class (then generation
    calls the model as usual)."""

    def __init__(self, model, trunk, layers, lm_head_call):
        self.model, self.trunk, self.layers, self.lm_head_call = model, trunk, layers, lm_head_call
        self.ops = model._ops
        self.runner = None  # the trunk in C++ (extension backend): the same ops without the Python between them

    @classmethod
    def capture(cls, model) -> DecodePlan | None:
        from torch import nn

        from .model import ModuleFormerForCausalLM, ModuleFormerModel
        from .modules import _GLOBAL_HOOKS, Block, _plain

        if not _plain(model, ModuleFormerForCausalLM) or model.training or any(_GLOBAL_HOOKS):
            return None
        parts = model._modules
        trunk = parts["transformer"]
        if not _plain(trunk, ModuleFormerModel):
            return None
        t = trunk._modules
        wte, drop, ln_f = t["wte"], t["drop"], t["ln_f"]
        if not (
            _plain(wte, nn.Embedding)
            and wte.max_norm is None
            and _plain(drop, nn.Dropout)
            and (not drop.training or drop.p == 0)
            and _plain(ln_f, nn.LayerNorm)
            and type(t["h"]) is nn.ModuleList
        ):
            return None
        head = _linear_call(parts["lm_head"])
        if head is None:
            return None
        layers = []
        for block in t["h"]:
            if not _plain(block, Block) or not block.direct_ready():
                return None
            layer = _capture_block(block)
            if layer is None:
                return None
            layers.append(layer)
        plan = cls(model, trunk, layers, head)
        plan.wte_weight, plan.ln_f = wte._parameters["weight"], _layer_norm_args(ln_f)
        plan.runner = _runner(model, layers)
        return plan

    def step(self, tokens: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """tokens [B, T] (ids the model's vocabulary holds) appended to `cache`, attention_mask [B, past + T] or
        None -> the last position's logits [B, V] float32, as model(tokens, attention_mask, cache, use_cache=True,
        return_aux_loss=False, logits_to_keep=1).logits[:, -1]."""
        from .model import float_logits

        return float_logits(self.lm_head_call(self.hidden(tokens, cache, attention_mask)[:, -1:]))[:, -1]

    def hidden(self, tokens: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The trunk's output [B, T, C] (after ln_f) for `step`."""
        from .model import padding_bias

        B, T = tokens.shape
        x = torch.nn.functional.embedding(tokens, self.wte_weight)  # [B, T, C]
        C = x.shape[-1]
        bias = padding_bias(self.trunk, attention_mask, B, cache.read_length(T))
        layer_norm = torch.nn.functional.layer_norm
        if (
            self.runner is not None
            and cache.window is None
            and not torch.is_grad_enabled()
            and not torch._C._is_torch_function_mode_enabled()
        ):
            cache.check_batch(B)
            positions, end = cache.reserve(T)
            cache.untrack()
            x = self.runner.run(x, bias, cache.keys, cache.values or [], positions, end)
            cache.advance()
            return layer_norm(x, *self.ln_f)
        ops = self.ops
        route_topk, moe_map, moe_reduce, moe_mlp = ops.route_topk, ops.moe_map, ops.moe_reduce, ops.moe_mlp
        for index, L in enumerate(self.layers):
            h = layer_norm(x, *L.ln_1)
            h2 = h.reshape(B * T, C)
            _, gates, _, slots, positions, offsets = route_topk(_router_logits(L.att_router, h2), L.att_k)
            q = moe_map(h2, *L.att_in, slots, positions, offsets, L.att_k, "none").view(B, T, *L.q_shape)
            if not L.kv:
                keys, values = h, None
            else:
                keys, values = (kernel(h, weight, bias) for kernel, weight, bias in L.kv)
            keys, values = cache.append(index, keys, values)
            if values is None:
                values = keys
            S = keys.shape[1]
            o = ops.sb_attention(q, keys.view(B, S, *L.q_shape[1:]), values.view(B, S, *L.q_shape[1:]), bias, L.scale)
            a = moe_reduce(o.reshape(B * T * L.q_shape[0], L.att_width), *L.att_out, gates, slots, positions, offsets)
            x = x + a.view(B, T, C)
            h2 = layer_norm(x, *L.ln_2).reshape(B * T, C)
            _, gates, _, slots, positions, offsets = route_topk(_router_logits(L.mlp_router, h2), L.mlp_k)
            m = moe_mlp(h2, *L.mlp_in, *L.mlp_out, gates, slots, positions, offsets, "gelu_new")
            x = x + m.view(B, T, C)
        cache.advance()
        return layer_norm(x, *self.ln_f)


class _PlannedBlock:
    """One block's tensors and kernels, as Block's direct path reads them. Routers and K/V projections are lists of
    (kernel, weight, bias) linear maps (an mlp router's GELU runs inside its first one)."""

    __slots__ = (
        "ln_1",
        "ln_2",
        "att_router",
        "att_k",
        "att_in",
        "att_out",
        "q_shape",
        "att_width",
        "scale",
        "kv",
        "mlp_router",
        "mlp_k",
        "mlp_in",
        "mlp_out",
    )


def _layer_norm_args(ln) -> tuple:
    p = ln._parameters
    return ln.normalized_shape, p["weight"], p.get("bias"), ln.eps


def _linear_call(module):
    """f(x) = the module's output, for a plain bound molm Linear or int8 linear (None for anything else)."""
    from .modules import _direct_linear, _plain
    from .quantization import QuantizedLinear

    if _direct_linear(module):
        kernel, p = module.kernel, module._parameters
        weight, bias = p["weight"], p["bias"]
        return lambda x: kernel(x, weight, bias)
    if _plain(module, QuantizedLinear) and module.kernel is not None:
        kernel, weight, scale, bias = module.kernel, module.weight, module.weight_scale, module.bias
        return lambda x: kernel(x, weight, scale, bias)
    return None


def _expert_tensors(experts) -> tuple | None:
    """(weight, scale) as the experts' forward hands them to the fused ops, for molm's own expert classes."""
    from .modules import ParallelExperts
    from .quantization import QuantizedExperts

    if type(experts) not in (ParallelExperts, QuantizedExperts):
        return None
    return experts.forward(lambda weight, scale: (weight, scale))


def _linear_maps(*modules) -> list:
    """(kernel, weight, bias) of bound molm Linears, as `_linear_kernel` calls them."""
    return [(m.kernel, m._parameters["weight"], m._parameters["bias"]) for m in modules]


def _router_maps(router) -> list:
    """A direct-ready router's linear maps (the caller has checked: an mlp gate whose GELU fuses into its first
    projection, or a single linear map)."""
    parts = router.w_gate._modules
    return _linear_maps(parts["0"], parts["3"]) if router.gate_type == "mlp" else _linear_maps(parts["0"])


def _router_logits(maps: list, h: torch.Tensor) -> torch.Tensor:
    """Router.direct_logits on captured maps."""
    if len(maps) == 1:
        kernel, weight, bias = maps[0]
        return kernel(h, weight, bias)
    (k0, w0, b0), (k1, w1, b1) = maps
    return k1(k0(h, w0, b0, "gelu"), w1, b1)


def _capture_block(block) -> _PlannedBlock | None:
    """The tensors Block.forward's direct path reads (the caller has checked `direct_ready`)."""
    import math

    parts = block._modules
    attn, mlpf = parts["attn"], parts["mlpf"]
    q_proj = attn._modules["q_proj"]
    tensors = [_expert_tensors(m._modules[name]) for m in (q_proj, mlpf) for name in ("experts", "output_experts")]
    if any(t is None for t in tensors):
        return None
    L = _PlannedBlock()
    L.ln_1, L.ln_2 = _layer_norm_args(parts["ln_1"]), _layer_norm_args(parts["ln_2"])
    L.att_in, L.att_out, L.mlp_in, L.mlp_out = tensors
    att_gate, mlp_gate = q_proj._modules["gate"], mlpf._modules["gate"]
    L.att_router, L.att_k = _router_maps(att_gate), att_gate.top_k
    L.mlp_router, L.mlp_k = _router_maps(mlp_gate), mlp_gate.top_k
    if L.att_k != attn.top_k:
        return None
    L.q_shape = (attn.top_k, attn.n_head, attn.head_size)
    L.att_width = attn.n_head * attn.head_size
    L.scale = 1.0 / math.sqrt(attn.head_size)
    L.kv = [] if attn.identity_kv else _linear_maps(attn._modules["k_proj"], attn._modules["v_proj"])
    return L


def _runner(model, layers):
    """The C++ trunk (csrc/decode_runner.h) for these blocks, where every op they call is the extension's registered
    op (it calls those ops itself): None otherwise (the reference backend, a rebound kernel)."""
    try:
        from . import _C, ops
    except ImportError:
        return None
    if not ops.extension_available() or not hasattr(_C, "DecodeRunner"):
        return None
    registered = torch.ops.molm
    if any(getattr(model._ops, n) is not getattr(registered, n).default for n in _RUNNER_OPS):
        return None
    runner = _C.DecodeRunner()
    for L in layers:
        if any(kernel is not ops.linear for kernel, _, _ in [*L.att_router, *L.mlp_router, *L.kv]):
            return None
        shape = L.ln_1[0]
        if tuple(L.ln_2[0]) != tuple(shape):
            return None
        kv = [(w, b) for _, w, b in L.kv] or [None, None]
        runner.add_block(
            norm_shape=list(shape),
            ln1_weight=L.ln_1[1],
            ln1_bias=L.ln_1[2],
            ln1_eps=L.ln_1[3],
            ln2_weight=L.ln_2[1],
            ln2_bias=L.ln_2[2],
            ln2_eps=L.ln_2[3],
            att_router=[(w, b) for _, w, b in L.att_router],
            att_k=L.att_k,
            att_in=L.att_in[0],
            att_in_scale=L.att_in[1],
            att_out=L.att_out[0],
            att_out_scale=L.att_out[1],
            heads=L.q_shape[1],
            head_size=L.q_shape[2],
            scale=L.scale,
            k_proj=kv[0],
            v_proj=kv[1],
            mlp_router=[(w, b) for _, w, b in L.mlp_router],
            mlp_k=L.mlp_k,
            mlp_in=L.mlp_in[0],
            mlp_in_scale=L.mlp_in[1],
            mlp_out=L.mlp_out[0],
            mlp_out_scale=L.mlp_out[1],
        )
    return runner


_RUNNER_OPS = ("route_topk", "moe_map", "moe_reduce", "moe_mlp", "sb_attention")
