"""The building blocks of ModuleFormer: Router, MoE (experts + router), MoA (stick-breaking mixture of attention),
Block, and the Linear that runs through the backend.

Parameter names follow the original checkpoints exactly (docs/model.md §2.1). Every op goes through a backend namespace
(`reference` = pure torch mirroring the original algorithm, `extension` = molm's C++/CUDA kernels), so the math
below is written once. Shape alphabet: B batch, T new positions, S cached + new, N = B*T tokens, k slots per token,
M = N*k rows, E experts, C model width, A att_hidden, H heads, D head size, F ffd_hidden.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .config import ModuleFormerConfig

OP_NAMES = (
    "route_topk",
    "gather_rows",
    "scatter_ksum",
    "expert_gemm",
    "sb_attention",
    "linear",
    "expert_gemm_q8",
    "linear_q8",
    "moe_map",
    "moe_reduce",
    "moe_mlp",
)
BACKENDS = ("reference", "extension")
# ops whose molm.ops wrapper only forwards its arguments (the model passes all of them, positionally)
DIRECT_OPS = ("route_topk", "sb_attention", "moe_map", "moe_reduce", "moe_mlp")

# torch's hooks on every module (nn.modules.module.register_module_forward_hook and friends)
_GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, name, {})
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
)


def _unhooked(module: nn.Module) -> bool:
    """No hook on `module` and no forward patched onto the instance (as accelerate's offload hooks do): calling its
    class's forward directly is the same as calling the module."""
    d = module.__dict__
    return not (
        d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
    ) and ("forward" not in d)


def _plain(module: nn.Module, cls: type) -> bool:
    """`module` is exactly a `cls` and `_unhooked`."""
    return type(module) is cls and _unhooked(module)


def backend_ops(name: str) -> SimpleNamespace:
    """The ops of one backend, by name."""
    if name == "reference":
        return SimpleNamespace(**{op: getattr(reference, op + "_ref") for op in OP_NAMES})
    if name == "extension":
        try:
            from . import ops
        except ImportError as exc:
            raise RuntimeError(f"molm backend 'extension' is not available: {exc}") from None
        if not ops.extension_available():
            raise RuntimeError(
                f"molm backend 'extension' is not available: {ops.extension_error()}; "
                "build it with `pip install --no-build-isolation -e .` or use backend='reference'"
            )
        # The model calls these with every argument: it gets the registered op itself, not the documented
        # wrapper (whose extra Python frame and overload lookup cost ~3 us a call, a tenth of a small layer's step).
        direct = {op: getattr(torch.ops.molm, op).default for op in DIRECT_OPS}
        return SimpleNamespace(**{op: direct.get(op) or getattr(ops, op) for op in OP_NAMES})
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


class Routing(NamedTuple):
    """Routing of one MoE site, computed once and shared by its two expert GEMMs."""

    probs: torch.Tensor  # [N, E]
    gates: torch.Tensor  # [N, k] raw probabilities of the chosen experts
    experts: torch.Tensor  # [N, k] int64
    sorted_slots: torch.Tensor  # [M] slot ids n*k+j in expert order
    slot_positions: torch.Tensor  # [M] inverse: where slot n*k+j sits in expert order
    expert_offsets: torch.Tensor  # [E+1]
    k: int


def _linear_kernel(linear: "Linear", x: torch.Tensor, *activation: str) -> torch.Tensor:
    """A plain bound molm Linear's forward (its kernel on its parameters, read without Module.__getattr__), with
    `activation` ("gelu") applied by the kernel when given."""
    p = linear._parameters
    return linear.kernel(x, p["weight"], p["bias"], *activation)


def _direct_linear(module: nn.Module) -> bool:
    """`module` is a plain molm Linear bound to a backend (see `_linear_kernel`)."""
    return _plain(module, Linear) and module.kernel is not None


class Linear(nn.Linear):
    """nn.Linear (same parameters, state_dict keys and PEFT targeting) whose product runs through the model's
    backend: with the extension, molm's linear op streams the weight once in its own dtype for decode-sized inputs.
    `bind_backend` sets `kernel`; an unbound Linear is a plain nn.Linear."""

    kernel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.kernel or F.linear)(x, self.weight, self.bias)

    def bind_ops(self, ops: SimpleNamespace) -> None:
        self.kernel = ops.linear


def bind_backend(model: nn.Module, ops: SimpleNamespace) -> None:
    """Point every module of `model` that calls an op itself (molm Linears, int8 linears) at the backend's ops."""
    for module in model.modules():
        if hasattr(module, "bind_ops"):
            module.bind_ops(ops)


class ParallelExperts(nn.Module):
    """E bias-free linear maps stored as one tensor [E, in, out] (y = x @ weight[e])."""

    def __init__(self, num_experts: int, input_size: int, output_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, input_size, output_size))
        bound = 1.0 / input_size  # the original's uniform(-1/in, 1/in); never left uninitialised
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, kernel):
        """kernel(weight, scale) with this module's weight (scale None: float weights). The MoE sites call their
        fused ops through here: reading `self.weight` inside a call of this module lets a parametrization of it
        (PEFT's target_parameters LoRA) apply."""
        return kernel(self.weight, None)

    def extra_repr(self) -> str:
        e, i, o = self.weight.shape
        return f"num_experts={e}, input_size={i}, output_size={o}"


class Router(nn.Module):
    """Router MLP -> softmax over all experts -> top-k of the probabilities (gate = raw probability) + MI aux loss."""

    def __init__(self, config: ModuleFormerConfig, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate_type, self.aux_loss_type = config.gate_type, config.aux_loss_type
        self.sample_topk = config.sample_topk
        C, G = config.n_embd, config.gating_size
        if config.gate_type == "mlp":
            self.w_gate = nn.Sequential(
                Linear(C, G), nn.GELU(), nn.Dropout(config.moe_pdrop), Linear(G, num_experts, bias=False)
            )
        elif config.gate_type == "linear":
            self.w_gate = nn.Sequential(Linear(C, num_experts, bias=False))
        else:  # "gmm": cosine similarity to learned centroids with a learned temperature
            self.w_gate = Linear(C, G, bias=False)
            self.expert_centroids = nn.Parameter(torch.randn(num_experts, G))
            self.temperature = nn.Parameter(torch.zeros(1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_type == "mlp" and self._gelu_fusable():
            return self.w_gate._modules["3"](_linear_kernel(self.w_gate._modules["0"], x, "gelu"))  # [N, E]
        if self.gate_type != "gmm":
            return self.w_gate(x)  # [N, E]
        z = F.normalize(self.w_gate(x), p=2, dim=-1)
        centroids = F.normalize(self.expert_centroids, p=2, dim=-1)
        return (z @ centroids.t()) * self.temperature.exp()

    def _gelu_fusable(self) -> bool:
        """Whether the mlp router's first projection may apply its GELU itself (one op: ATen's GELU would wake
        torch's OpenMP workers for a single row, which costs more than the projection). Only while the Sequential
        holds molm's own modules, unwrapped (a PEFT adapter on w_gate.0 must see its output before the GELU) and
        without hooks, and the dropout between them is inactive. Read from the Sequential on every call (modules
        can be swapped or hooked at any time), through its module dict (its indexing costs more than the rest)."""
        parts = self.w_gate._modules
        first, gelu, dropout = parts["0"], parts["1"], parts["2"]
        return (
            _plain(self.w_gate, nn.Sequential)
            and _direct_linear(first)
            and _plain(gelu, nn.GELU)
            and gelu.approximate == "none"
            and _plain(dropout, nn.Dropout)
            and (not dropout.training or dropout.p == 0)
        )

    def direct_ready(self) -> bool:
        """Whether `direct_logits` + `route` may stand for this router's call: a plain Router routing greedily whose
        gate is a plain single linear map or an mlp whose GELU fuses and whose last projection is plain."""
        if not _plain(self, Router) or (self.training and self.sample_topk > 0):
            return False
        parts = self.w_gate._modules
        if self.gate_type == "mlp":
            return self._gelu_fusable() and _direct_linear(parts["3"])
        if self.gate_type == "linear":
            return _plain(self.w_gate, nn.Sequential) and _direct_linear(parts["0"])
        return False

    def direct_logits(self, x: torch.Tensor) -> torch.Tensor:
        """`logits` with the projections' kernels called here (only where `direct_ready`)."""
        parts = self.w_gate._modules
        if self.gate_type == "mlp":
            return _linear_kernel(parts["3"], _linear_kernel(parts["0"], x, "gelu"))
        return _linear_kernel(parts["0"], x)

    def forward(self, x: torch.Tensor, ops: SimpleNamespace, want_aux_loss: bool = True):
        """x [N, C] -> (Routing, aux loss or None)."""
        return self.route(self.logits(x), ops, want_aux_loss)

    def route(self, logits: torch.Tensor, ops: SimpleNamespace, want_aux_loss: bool = True):
        """logits [N, E] -> (Routing, aux loss or None)."""
        if self.training and self.sample_topk > 0:
            routing = self._sampled_routing(logits)
        else:
            routing = Routing(*ops.route_topk(logits, self.top_k), self.top_k)
        aux = self.aux_loss(logits, routing) if want_aux_loss else None
        return routing, aux

    def _sampled_routing(self, logits: torch.Tensor) -> Routing:
        """Training with sample_topk = s: top-(k-s) greedily, s more sampled from the rest (gates stay raw probs)."""
        probs = torch.softmax(logits, dim=-1)
        greedy = probs.topk(self.top_k - self.sample_topk, dim=-1).indices  # [N, k-s]
        weights = (probs.detach() + 1e-6).scatter(1, greedy, 0.0)
        experts = torch.cat([greedy, torch.multinomial(weights, self.sample_topk)], dim=-1)  # [N, k]
        gates = probs.gather(1, experts)
        sorted_slots, slot_positions, offsets = reference.sort_by_expert(experts, self.num_experts)
        return Routing(probs, gates, experts, sorted_slots, slot_positions, offsets, self.top_k)

    def aux_loss(self, logits: torch.Tensor, routing: Routing) -> torch.Tensor:
        """MI loss H(e|x) - H(e) (docs/model.md §4), or switch + 0.1 * z loss for any other aux_loss_type."""
        probs = routing.probs
        if self.aux_loss_type == "mi":
            neg_conditional_entropy = (probs * torch.log_softmax(logits, dim=-1)).sum() / probs.shape[0]
            marginal = probs.mean(0)  # [E]
            marginal_entropy = -(marginal * (marginal + 1e-8).log()).sum()
            return -(neg_conditional_entropy + marginal_entropy)
        freq = torch.zeros_like(probs).scatter(1, routing.experts, 1.0).sum(0)
        switch = self.num_experts * (F.normalize(probs.sum(0), p=1, dim=0) * F.normalize(freq, p=1, dim=0)).sum()
        z_loss = (torch.logsumexp(logits, dim=-1) ** 2).mean()
        return switch + 0.1 * z_loss


class MoE(nn.Module):
    """Sparse mixture of experts: `experts` (up / query projection), `output_experts` (down / output projection)."""

    def __init__(self, config: ModuleFormerConfig, num_experts: int, top_k: int, hidden_size: int):
        super().__init__()
        C = config.n_embd
        self.experts = ParallelExperts(num_experts, C, hidden_size)
        self.output_experts = ParallelExperts(num_experts, hidden_size, C)
        self.gate = Router(config, num_experts, top_k)

    def direct_ready(self) -> bool:
        """Whether Block's direct path may run this MoE: plain, with a direct-ready router and unhooked experts
        (whose own forward is then called: a parametrization of their weight still applies)."""
        parts = self._modules
        return (
            _plain(self, MoE)
            and parts["gate"].direct_ready()
            and _unhooked(parts["experts"])
            and _unhooked(parts["output_experts"])
        )

    def mlp(self, h: torch.Tensor, ops: SimpleNamespace, want_aux_loss: bool = True, direct: bool = False):
        """The MoE MLP: sum_j p_j * (gelu_new(h @ W1[e_j]) @ W2[e_j]). h [N, C] -> ([N, C], aux).
        direct: the submodules' forwards are called without their module calls (see Block.forward)."""
        r, aux = self.route(h, ops, want_aux_loss, direct)
        routing = (r.gates, r.sorted_slots, r.slot_positions, r.expert_offsets)
        experts, output_experts = self._experts(direct)
        # one fused op needs both weights: it runs inside both experts' calls, so each one's parametrization applies
        out = experts(
            lambda w1, s1: output_experts(lambda w2, s2: ops.moe_mlp(h, w1, s1, w2, s2, *routing, "gelu_new"))
        )
        return out, aux

    def route(self, h: torch.Tensor, ops: SimpleNamespace, want_aux_loss: bool = True, direct: bool = False):
        """The router's (Routing, aux loss or None) for h [N, C]."""
        gate = self._modules["gate"]
        return gate.route(gate.direct_logits(h), ops, want_aux_loss) if direct else gate(h, ops, want_aux_loss)

    def _experts(self, direct: bool):
        parts = self._modules
        experts, output_experts = parts["experts"], parts["output_experts"]
        return (experts.forward, output_experts.forward) if direct else (experts, output_experts)

    def map(self, h: torch.Tensor, r: Routing, ops: SimpleNamespace, direct: bool = False) -> torch.Tensor:
        """Per-slot expert inputs projections, in slot order: h [N, C] -> [M, A] (row n*k+j = h[n] @ W[e_nj])."""
        routing = (r.sorted_slots, r.slot_positions, r.expert_offsets)
        return self._experts(direct)[0](lambda w, s: ops.moe_map(h, w, s, *routing, r.k, "none"))

    def reduce(self, o: torch.Tensor, r: Routing, ops: SimpleNamespace, direct: bool = False) -> torch.Tensor:
        """Output projections of slot-ordered rows, gate-weighted k-sum: o [M, A] -> [N, C]."""
        routing = (r.gates, r.sorted_slots, r.slot_positions, r.expert_offsets)
        return self._experts(direct)[1](lambda w, s: ops.moe_reduce(o, w, s, *routing))


class MoA(nn.Module):
    """Mixture of stick-breaking attention experts: private Wq/Wo per expert, K and V shared by all experts."""

    def __init__(self, config: ModuleFormerConfig):
        super().__init__()
        self.n_head, self.head_size, self.top_k = config.n_head, config.head_size, config.k_att
        self.q_proj = MoE(config, config.n_att_experts, config.k_att, config.att_hidden)
        if config.identity_kv:
            self.k_proj, self.v_proj = nn.Identity(), nn.Identity()
        else:
            self.k_proj = Linear(config.n_embd, config.att_hidden)
            self.v_proj = Linear(config.n_embd, config.att_hidden)
        self.identity_kv = config.identity_kv

    def direct_ready(self) -> bool:
        """Whether Block's direct path may run this MoA (plain, K = V or plain K/V projections, a direct-ready query
        MoE)."""
        parts = self._modules
        kv_ready = self.identity_kv or (_direct_linear(parts["k_proj"]) and _direct_linear(parts["v_proj"]))
        return _plain(self, MoA) and kv_ready and parts["q_proj"].direct_ready()

    def forward(
        self,
        h: torch.Tensor,
        bias: torch.Tensor | None,
        cache,
        layer: int,
        ops: SimpleNamespace,
        want_aux_loss: bool = True,
        direct: bool = False,
    ):
        """h [B, T, C] (ln_1 output), bias [B, S] additive float32 or None -> ([B, T, C], aux).
        direct: the submodules' forwards are called without their module calls (see Block.forward)."""
        B, T, C = h.shape
        H, D, k = self.n_head, self.head_size, self.top_k
        h2 = h.reshape(B * T, C)  # [N, C]
        q_proj = self._modules["q_proj"]
        r, aux = q_proj.route(h2, ops, want_aux_loss, direct)
        q = q_proj.map(h2, r, ops, direct).view(B, T, k, H, D)  # [B, T, k, H, D]
        if self.identity_kv:
            keys, values = h, None  # K = V = ln_1 output: stored once
        elif direct:
            keys, values = _linear_kernel(self._modules["k_proj"], h), _linear_kernel(self._modules["v_proj"], h)
        else:
            keys, values = self.k_proj(h), self.v_proj(h)  # [B, T, A] each
        if cache is not None:
            keys, values = cache.append(layer, keys, values)  # [B, S, A]
        if values is None:
            values = keys
        S = keys.shape[1]
        o = ops.sb_attention(q, keys.view(B, S, H, D), values.view(B, S, H, D), bias, 1.0 / math.sqrt(D))
        out = q_proj.reduce(o.reshape(B * T * k, H * D), r, ops, direct)  # [N, C]
        return out.view(B, T, C), aux


class Block(nn.Module):
    """Pre-LN block: x + MoA(ln_1(x)), then x + MoE_MLP(ln_2(x))."""

    def __init__(self, config: ModuleFormerConfig):
        super().__init__()
        # The original ignores config.layer_norm_epsilon and builds LayerNorms with torch's default eps (1e-5).
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = MoA(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlpf = MoE(config, config.n_mlp_experts, config.k_mlp, config.ffd_hidden)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # skipped where it is the identity: a module call per residual is a measurable share of a decode step
        return self.resid_dropout(x) if self.training and self.resid_dropout.p > 0 else x

    def direct_ready(self) -> bool:
        """Whether forward may take the direct path: in eval mode, with every module it would call plain (exactly
        molm's or torch's own class, no hook, no patched forward) and no global module hook."""
        if self.training or any(_GLOBAL_HOOKS):
            return False
        parts = self._modules
        return (
            _plain(parts["ln_1"], nn.LayerNorm)
            and _plain(parts["ln_2"], nn.LayerNorm)
            and parts["attn"].direct_ready()
            and parts["mlpf"].direct_ready()
        )

    def forward(self, x: torch.Tensor, bias, cache, layer: int, ops: SimpleNamespace, want_aux_loss: bool = True):
        """The direct path (where `direct_ready`) calls the submodules' forwards and the routers' kernels itself
        instead of going through each module's call: the same ops on the same arguments, so the same results,
        without the Python of a dozen module calls (a third of a small model's decode step). Any hook, wrapper
        (PEFT), patched forward (accelerate) or training mode takes the module path."""
        B, T, C = x.shape
        parts = self._modules
        if self.direct_ready():
            attn, mlpf = parts["attn"], parts["mlpf"]
            a, att_aux = attn.forward(_layer_norm(parts["ln_1"], x), bias, cache, layer, ops, want_aux_loss, True)
            x = x + a
            m, mlp_aux = mlpf.mlp(_layer_norm(parts["ln_2"], x).reshape(B * T, C), ops, want_aux_loss, True)
            x = x + m.view(B, T, C)
        else:
            a, att_aux = self.attn(self.ln_1(x), bias, cache, layer, ops, want_aux_loss)
            x = x + self._dropout(a)
            m, mlp_aux = self.mlpf.mlp(self.ln_2(x).reshape(B * T, C), ops, want_aux_loss)
            x = x + self._dropout(m.view(B, T, C))
        return x, (att_aux + mlp_aux if want_aux_loss else None)


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """nn.LayerNorm.forward of a plain LayerNorm, its parameters read without Module.__getattr__."""
    p = ln._parameters
    return F.layer_norm(x, ln.normalized_shape, p["weight"], p.get("bias"), ln.eps)
