"""ModuleFormer / MoLM (IBM, arXiv 2306.04640): the trunk, the causal-LM head and the sequence-classification head.

Reproduces `ModuleFormerForCausalLM` of github:IBM/ModuleFormer (specification: docs/model.md) with the
same state_dict keys. No positional encoding; stick-breaking mixture-of-attention; sparse MoE MLP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .cache import KVCache
from .config import ModuleFormerConfig
from .modules import BACKENDS, Block, Linear, ParallelExperts, Router, backend_ops, bind_backend


@dataclass
class ExpertEdits:
    """What molm.extend / molm.prune did to a model, read by molm.train and by users."""

    # parameter name -> leading rows that stay frozen (extend(freeze_old=True): the old experts and router rows)
    frozen_rows: dict[str, int] = field(default_factory=dict)
    # "att.<layer>" / "mlp.<layer>" -> the original ids of the experts prune kept, ascending
    kept_experts: dict[str, list[int]] = field(default_factory=dict)
    # same keys -> the factor prune(rescale=True) applied to the kept output projections (1.0 without rescale)
    output_scale: dict[str, float] = field(default_factory=dict)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # float32: [B, T, V] (causal LM) or [B, num_labels] (classification)
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # sum over all 2 * n_layer routers
    past_key_values: Any = None  # KVCache, or the legacy tuple when one was passed in
    # with output_hidden_states: n_layer + 1 tensors [B, T, C], the embeddings first and the ln_f output last
    hidden_states: tuple[torch.Tensor, ...] | None = None


# A pytree node, so that torch.export / torch.compile graphs can return it (its fields are tensors, None or a cache).
torch.export.register_dataclass(ModelOutput, serialized_type_name="molm.ModelOutput")


def default_backend() -> str:
    """'extension' when molm's compiled ops are importable, else 'reference'."""
    try:
        from . import ops
    except ImportError:
        return "reference"
    return "extension" if ops.extension_available() else "reference"


# --- the trunk as functions of any module that holds its parts (wte, drop, h, ln_f): molm's ModuleFormerModel, and
# the transformers base model (molm.hf), which must be a PreTrainedModel itself and so cannot subclass it.


def add_trunk_modules(module: nn.Module, config: ModuleFormerConfig, block_class: type = Block) -> None:
    """Give `module` the trunk's parts, with the original's state_dict keys (wte, h.N, ln_f)."""
    module.wte = nn.Embedding(config.vocab_size, config.n_embd)
    module.drop = nn.Dropout(config.embd_pdrop)
    module.h = nn.ModuleList(block_class(config) for _ in range(config.n_layer))
    module.ln_f = nn.LayerNorm(config.n_embd)
    # transformers' gradient_checkpointing_enable() sets these two (the function wraps torch's checkpoint)
    module.gradient_checkpointing = False
    module._gradient_checkpointing_func = None


def padding_bias(trunk, attention_mask: torch.Tensor | None, batch: int, total: int) -> torch.Tensor | None:
    """attention_mask [B, S] (1 keep, 0 pad) -> additive float32 bias [B, S]: 0 or the model dtype's min."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, total):
        raise ValueError(
            f"attention_mask must have shape [batch, past + new] = [{batch}, {total}], got {list(attention_mask.shape)}"
        )
    dtype_min = torch.finfo(trunk.wte.weight.dtype).min
    return (1.0 - attention_mask.to(torch.float32)) * dtype_min


def trunk_forward(
    trunk,
    input_ids,
    attention_mask=None,
    cache: KVCache | None = None,
    token_type_ids=None,
    ops=None,
    want_aux_loss: bool = True,
    inputs_embeds=None,
    output_hidden_states: bool = False,
):
    """input_ids [B, T] (or inputs_embeds [B, T, C]) -> (hidden [B, T, C], aux loss or None, all hidden states
    or None). Appends to `cache` when given."""
    x = trunk.wte(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, C]
    B, T = x.shape[:2]
    bias = padding_bias(trunk, attention_mask, B, cache.read_length(T) if cache is not None else T)
    if token_type_ids is not None:  # the original's semantics: token types index the token embeddings
        x = x + trunk.wte(token_type_ids)
    x = trunk.drop(x)
    aux = None
    states = [] if output_hidden_states else None
    checkpointing = trunk.gradient_checkpointing and trunk.training and torch.is_grad_enabled()
    if checkpointing and cache is not None:
        raise ValueError(
            "gradient checkpointing recomputes each block, which would append to the KV cache "
            "twice: pass use_cache=False while training with gradient checkpointing"
        )
    for layer, block in enumerate(trunk.h):
        if states is not None:
            states.append(x)
        # a block with a gradient_checkpointing flag of its own (transformers' GradientCheckpointingLayer)
        # checkpoints itself
        if checkpointing and not hasattr(block, "gradient_checkpointing"):
            x, block_aux = trunk._gradient_checkpointing_func(block.__call__, x, bias, cache, layer, ops, want_aux_loss)
        else:
            x, block_aux = block(x, bias, cache, layer, ops, want_aux_loss)
        if want_aux_loss:
            aux = block_aux if aux is None else aux + block_aux
    if cache is not None:
        cache.advance()
    x = trunk.ln_f(x)
    if states is not None:
        states.append(x)
    return x, aux, (tuple(states) if states is not None else None)


class ModuleFormerModel(nn.Module):
    """The trunk: embeddings, blocks, final LayerNorm (the functions above, as methods)."""

    def __init__(self, config: ModuleFormerConfig):
        super().__init__()
        self.config = config
        add_trunk_modules(self, config)

    padding_bias = padding_bias
    forward = trunk_forward


def trunk_of(model) -> nn.Module:
    """The module holding the trunk's parts: `model.transformer` for the heads, the model itself for a base
    model."""
    return getattr(model, "transformer", model)


@torch.no_grad()
def init_module(module: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """The original initialisation of one module: normal(0, std) for Linear/Embedding, zero biases, unit
    LayerNorms, uniform(-1/in, 1/in) for expert weights, normal centroids and zero temperature for gmm routers.
    Random numbers come from the CPU (optionally seeded) generator, so any device gets the same values."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()
    elif isinstance(module, ParallelExperts):
        bound = 1.0 / module.weight.shape[1]
        module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 2 * bound - bound)
    elif isinstance(module, Router) and module.gate_type == "gmm":
        module.expert_centroids.copy_(torch.randn(module.expert_centroids.shape, generator=generator))
        module.temperature.zero_()


class ModuleFormerPreTrainedModel(nn.Module):
    """Shared plumbing: config, backend switch, input checks, cache handling, init, save/load."""

    def __init__(self, config: ModuleFormerConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.expert_edits = ExpertEdits()
        self.set_backend(backend or default_backend())

    def set_backend(self, backend: str) -> "ModuleFormerPreTrainedModel":
        """'reference' (pure torch, the original algorithm) or 'extension' (molm's kernels)."""
        self._ops = backend_ops(backend)
        self.backend = backend
        bind_backend(self, self._ops)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "ModuleFormerPreTrainedModel":
        """The original initialisation: normal(0, initializer_range) for Linear/Embedding, zero biases, unit
        LayerNorms, uniform(-1/in, 1/in) for expert weights."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            init_module(module, self.config.initializer_range, generator)
        return self

    def check_input_ids(self, input_ids) -> None:
        check_input_ids(input_ids, self.transformer.wte.num_embeddings)

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or the parameters one token uses (k of E experts per MoE site)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        c = self.config
        for block in self.transformer.h:
            for moe, k in ((block.attn.q_proj, c.k_att), (block.mlpf, c.k_mlp)):
                for experts in (moe.experts, moe.output_experts):
                    e = experts.weight.shape[0]
                    total -= experts.weight.numel() * (e - k) // e
        return total

    def save_pretrained(self, directory, max_shard_size: int = 5 * 2**30, safe_serialization: bool = True) -> None:
        checkpoint.save_pretrained(
            self, directory, max_shard_size=max_shard_size, safe_serialization=safe_serialization
        )

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", backend=None, quantize=None):
        return checkpoint.load(path, dtype=dtype, device=device, backend=backend, cls=cls, quantize=quantize)


class ModuleFormerForCausalLM(ModuleFormerPreTrainedModel):
    def __init__(self, config: ModuleFormerConfig, backend: str | None = None):
        super().__init__(config, backend)
        self.transformer = ModuleFormerModel(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.set_backend(self.backend)  # binds the Linears built above

    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        past_key_values=None,
        use_cache=False,
        token_type_ids=None,
        return_aux_loss: bool = True,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """input_ids [B, T]; attention_mask [B, past + T]; labels [B, T] (-100 = ignore, shifted inside).

        `logits_to_keep` > 0 computes logits for the last positions only (generation); aux loss is skipped when
        return_aux_loss=False and no labels need it.
        """
        return causal_lm_forward(
            self,
            input_ids,
            attention_mask,
            labels,
            past_key_values,
            use_cache,
            token_type_ids,
            return_aux_loss,
            logits_to_keep,
            output_hidden_states,
        )


class ModuleFormerForSequenceClassification(ModuleFormerPreTrainedModel):
    """Scores every position, pools the last token that is not padding (either padding side)."""

    def __init__(self, config: ModuleFormerConfig, backend: str | None = None):
        super().__init__(config, backend)
        if not config.num_labels:
            config.num_labels = 2
        self.transformer = ModuleFormerModel(config)
        self.score = Linear(config.n_embd, config.num_labels, bias=False)
        self.set_backend(self.backend)  # binds the Linears built above

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def forward(
        self,
        input_ids,
        attention_mask=None,
        labels=None,
        past_key_values=None,
        use_cache=False,
        token_type_ids=None,
        return_aux_loss: bool = True,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        return sequence_classification_forward(
            self,
            input_ids,
            attention_mask,
            labels,
            past_key_values,
            use_cache,
            token_type_ids,
            return_aux_loss,
            output_hidden_states,
        )


# --- the forward passes, shared with the transformers classes (molm.hf): `model` is any module with `config`,
# `transformer` (a ModuleFormerModel), `_ops` and the head (`lm_head` / `score`), and everything is read from them
# at call time, so a replaced head or an edited config takes effect at once.


# ATen runs an elementwise op or a reduction over at least this many elements as an OpenMP region (its grain size).
# After a region its workers spin unless OMP_WAIT_POLICY=PASSIVE (what molm sets when it is imported before torch), and
# spinning workers take a core from molm's own kernels: two regions at the end of each decode step (the logits'
# widening, the greedy argmax) made a MoLM-350M-4B bf16 step on 2 cores 20 % slower.
ATEN_PARALLEL_GRAIN = 32768


def _serial_slices(length: int, rows: int):
    """Column slices of a [rows, length] tensor small enough that ATen runs each op on them serially (none when the
    rows alone are too large: then one parallel op is the better choice)."""
    step = (ATEN_PARALLEL_GRAIN - 1) // max(rows, 1)
    if step < 1024:
        return None
    return [slice(c, min(c + step, length)) for c in range(0, length, step)]


def float_logits(logits: torch.Tensor) -> torch.Tensor:
    """logits [..., V] in float32, widened without an OpenMP region on the CPU (see ATEN_PARALLEL_GRAIN)."""
    if logits.dtype == torch.float32 or logits.device.type != "cpu" or logits.numel() < ATEN_PARALLEL_GRAIN:
        return logits.float()
    rows = logits.numel() // logits.shape[-1]
    slices = _serial_slices(logits.shape[-1], rows)
    if slices is None:
        return logits.float()
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for cols in slices:
        out[..., cols].copy_(logits[..., cols])
    return out


def check_input_ids(input_ids, vocab_size: int) -> None:
    """input_ids must be an int64/int32 [batch, length] tensor of ids below the embedding's row count."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {list(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)}): give at least one token")
    if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():  # elsewhere: a host sync
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token id {bad} is out of range for vocab_size {vocab_size} (the rows of the input embedding)"
            )


def run_trunk(
    model,
    input_ids,
    attention_mask,
    past_key_values,
    use_cache,
    token_type_ids,
    want_aux_loss,
    inputs_embeds=None,
    output_hidden_states: bool = False,
):
    """The trunk with cache handling: -> (hidden [B, T, C], aux, cache or legacy tuple or None, hidden states)."""
    trunk = trunk_of(model)
    wte = trunk.wte
    if inputs_embeds is None:
        check_input_ids(input_ids, wte.num_embeddings)
        batch, length = input_ids.shape
    else:
        if input_ids is not None:
            raise ValueError("pass either input_ids or inputs_embeds, not both")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != wte.embedding_dim:
            raise ValueError(
                f"inputs_embeds must have shape [batch, length, {wte.embedding_dim}], got {list(inputs_embeds.shape)}"
            )
        batch, length = inputs_embeds.shape[:2]
    if token_type_ids is not None:
        check_input_ids(token_type_ids, wte.num_embeddings)
    legacy = isinstance(past_key_values, (tuple, list))
    cache = past_key_values
    if legacy:
        cache = KVCache.from_legacy(past_key_values, model.config.identity_kv) if past_key_values else None
    if cache is None and use_cache:
        cache = KVCache.for_model(model, batch, length)
    if cache is not None and not isinstance(cache, KVCache):
        raise TypeError(f"past_key_values must be a molm KVCache or a tuple of (K, V), got {type(cache).__name__}")
    hidden, aux, states = trunk_forward(
        trunk,
        input_ids,
        attention_mask,
        cache,
        token_type_ids,
        model._ops,
        want_aux_loss,
        inputs_embeds,
        output_hidden_states,
    )
    if cache is not None and legacy:
        cache = cache.to_legacy()
    return hidden, aux, (cache if (use_cache or past_key_values is not None) else None), states


def causal_lm_forward(
    model,
    input_ids,
    attention_mask=None,
    labels=None,
    past_key_values=None,
    use_cache=False,
    token_type_ids=None,
    return_aux_loss: bool = True,
    logits_to_keep: int = 0,
    output_hidden_states: bool = False,
    inputs_embeds=None,
    num_items_in_batch=None,
    shift_labels=None,
) -> ModelOutput:
    """Causal-LM forward of `model` (see ModuleFormerForCausalLM.forward). With `num_items_in_batch` (the
    number of label tokens in the whole accumulated batch) the LM loss is the token sum divided by it.
    `shift_labels` [B, T] are targets already aligned with the logits (position t predicts shift_labels[t]), for
    sequence-parallel training that shifts the whole sequence before splitting it; they replace labels[:, 1:]."""
    config = model.config
    aux_weight = config.aux_loss_weight
    want_aux = return_aux_loss or ((labels is not None or shift_labels is not None) and aux_weight > 0)
    hidden, aux, cache, states = run_trunk(
        model,
        input_ids,
        attention_mask,
        past_key_values,
        use_cache,
        token_type_ids,
        want_aux,
        inputs_embeds,
        output_hidden_states,
    )
    kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
    logits = float_logits(model.lm_head(kept))  # [B, T, V]
    loss = None
    if labels is not None or shift_labels is not None:
        given, name = (labels, "labels") if shift_labels is None else (shift_labels, "shift_labels")
        if given.shape != hidden.shape[:2]:
            raise ValueError(
                f"{name} must have the shape of input_ids {list(hidden.shape[:2])}, got {list(given.shape)}"
            )
        if logits_to_keep:
            raise ValueError(f"{name} need logits at every position: do not pass logits_to_keep")
        if shift_labels is None:
            flat_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            flat_labels = labels[:, 1:].reshape(-1).to(logits.device)
        else:
            flat_logits = logits.reshape(-1, logits.shape[-1])
            flat_labels = shift_labels.reshape(-1).to(logits.device)
        if num_items_in_batch is None:
            loss = F.cross_entropy(flat_logits, flat_labels)
        else:
            loss = F.cross_entropy(flat_logits, flat_labels, reduction="sum") / num_items_in_batch
        loss = loss.to(hidden.dtype)
        if aux_weight > 0:
            loss = loss + aux * aux_weight
    return ModelOutput(logits=logits, loss=loss, aux_loss=aux, past_key_values=cache, hidden_states=states)


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """[B] position of each row's rightmost token that is not padding (left or right padding alike)."""
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined: set config.pad_token_id")
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)
    return (positions * input_ids.ne(pad_token_id)).argmax(-1)


def last_attended_index(
    attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor:
    """[B] position of each row's rightmost attended position (the last position without a mask): pooling for
    inputs_embeds, which carry no token ids to compare with the pad id."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    positions = torch.arange(length, device=attention_mask.device)
    return (positions * attention_mask[:, -length:].ne(0)).argmax(-1)


def sequence_classification_forward(
    model,
    input_ids,
    attention_mask=None,
    labels=None,
    past_key_values=None,
    use_cache=False,
    token_type_ids=None,
    return_aux_loss: bool = True,
    output_hidden_states: bool = False,
    inputs_embeds=None,
) -> ModelOutput:
    hidden, aux, cache, states = run_trunk(
        model,
        input_ids,
        attention_mask,
        past_key_values,
        use_cache,
        token_type_ids,
        return_aux_loss,
        inputs_embeds,
        output_hidden_states,
    )
    logits = model.score(hidden).float()  # [B, T, L]
    if input_ids is not None:
        last = last_token_index(input_ids, model.config.pad_token_id)
    else:
        last = last_attended_index(attention_mask, hidden.shape[0], hidden.shape[1], hidden.device)
    pooled = logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]  # [B, L]
    loss = None
    if labels is not None:
        loss = classification_loss(pooled, labels, model.config)
    return ModelOutput(logits=pooled, loss=loss, aux_loss=aux, past_key_values=cache, hidden_states=states)


def classification_loss(pooled: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    num_labels = config.num_labels
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return (
            F.mse_loss(pooled.squeeze(), labels.squeeze().float())
            if num_labels == 1
            else F.mse_loss(pooled, labels.float())
        )
    if problem == "single_label_classification":
        return F.cross_entropy(pooled.view(-1, num_labels), labels.view(-1))
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(pooled, labels.float())
    raise ValueError(
        f"config.problem_type must be regression, single_label_classification or "
        f"multi_label_classification, got {problem!r}"
    )


ARCHITECTURES = {
    "ModuleFormerForCausalLM": ModuleFormerForCausalLM,
    "ModuleFormerForSequenceClassification": ModuleFormerForSequenceClassification,
}
__all__ = [
    "ModelOutput",
    "ModuleFormerModel",
    "ModuleFormerForCausalLM",
    "ModuleFormerForSequenceClassification",
    "ARCHITECTURES",
    "BACKENDS",
]
