"""Hugging Face transformers adapter (optional extra `molm[hf]`): ModuleFormer as `PreTrainedModel`s.

The classes are molm's model as a transformers model: the base model (`ModuleFormerModel`, AutoModel) owns the
trunk's parts, the heads own it as `transformer` plus `lm_head` / `score`, with the original's state_dict keys, and
all run molm's own forward functions on them (same kernels), reading the live `config` and modules at every call.
So `from_pretrained`, `save_pretrained`, `generate` (greedy, sampling, beam search, assisted and prompt-lookup
decoding), `resize_token_embeddings`, gradient checkpointing, Trainer, PEFT (LoRA on any nn.Linear,
`target_parameters` on the expert weights, `modules_to_save`) and the Auto* classes work on transformers 4.5x and
5.x. Importing this module registers the classes with AutoConfig / AutoModel / AutoModelForCausalLM /
AutoModelForSequenceClassification.

Generation keeps molm's cache (one tensor per layer when K = V) instead of a transformers `Cache`: `GenerationCache`
adds the part of the `Cache` interface generate uses (length, crop, beam reordering). The empty DynamicCache that
generate creates is swapped for it on the first step, a filled DynamicCache or the legacy tuple is copied into it,
other cache kinds are refused by name. The cache is returned under the name this transformers version reads back
(`past_key_values` in 4.x, `cache` in late 5.x).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DynamicCache,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from . import config as molm_config
from . import model as molm_model
from .cache import KVCache, register_pytree
from .modules import Block, Linear, backend_ops, bind_backend

# Fields that PretrainedConfig owns itself (token ids, labels, dtype, ...): passed to its __init__, not set here.
_HF_OWNED = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tie_word_embeddings",
    "architectures",
    "torch_dtype",
    "num_labels",
    "problem_type",
    "use_cache",
    "extra",
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(molm_config.ModuleFormerConfig) if f.name not in _HF_OWNED}


class ModuleFormerConfig(PretrainedConfig):
    """The original's config class: every molm.ModuleFormerConfig field as an attribute (+ HF's own)."""

    model_type = molm_config.MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = dict(molm_config.ALIASES)  # hidden_size -> n_embd, ...

    def __init__(
        self,
        bos_token_id=50256,
        eos_token_id=50256,
        pad_token_id=None,
        tie_word_embeddings=False,
        use_cache=True,
        **kwargs,
    ):
        for name, default in _DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        kwargs.pop("n_ctx", None)  # derived: history_length * n_layer (the property below)
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.to_molm()  # validate now: a bad field fails here with molm's message naming it

    identity_kv = molm_config.ModuleFormerConfig.identity_kv  # the same derived fields as molm's config
    head_size = molm_config.ModuleFormerConfig.head_size

    @property
    def n_ctx(self) -> int:
        return self.history_length * self.n_layer

    @property
    def max_position_embeddings(self) -> int:
        return self.history_length + self.block_size

    def to_molm(self) -> molm_config.ModuleFormerConfig:
        """The molm config (validated) that the trunk is built from."""
        fields = {name: getattr(self, name) for name in _DEFAULTS}
        problem_type = getattr(self, "problem_type", None)
        return molm_config.ModuleFormerConfig(
            **fields,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=bool(self.tie_word_embeddings),
            use_cache=bool(self.use_cache),
            architectures=self.architectures,
            num_labels=self.num_labels,
            problem_type=problem_type,
        )


# transformers 5.x renamed the cache field of model outputs (and generate's kwarg) from past_key_values to cache,
# and refuses outputs that carry both names: use the one this version's own output classes use.
CACHE_NAME = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def _output_class(name: str, fields: list[str]) -> type:
    types = {
        "last_hidden_state": Optional[torch.Tensor],
        "loss": Optional[torch.Tensor],
        "logits": Optional[torch.Tensor],
        CACHE_NAME: Any,
        "aux_loss": Optional[torch.Tensor],
        "hidden_states": Optional[tuple],
    }
    cls = dataclasses.make_dataclass(name, [(f, types[f], None) for f in fields], bases=(ModelOutput,))
    cls.__module__ = __name__
    return cls


ModuleFormerOutput = _output_class("ModuleFormerOutput", ["loss", "logits", CACHE_NAME, "aux_loss", "hidden_states"])
# the base model's output: BaseModelOutputWithPast's fields (no attentions: they are never materialised) + aux loss
ModuleFormerModelOutput = _output_class(
    "ModuleFormerModelOutput", ["last_hidden_state", CACHE_NAME, "hidden_states", "aux_loss"]
)


class GenerationCache(KVCache):
    """molm's KVCache (K = V stored once per layer) with the part of transformers' `Cache` interface that generate
    uses: its length, cropping (assisted and prompt-lookup decoding roll back rejected draft tokens) and beam
    reordering. Every position stays in the buffers until overwritten, so cropping needs no recorded past."""

    is_compileable = False  # the length is a host integer and the buffers grow by reallocation: not fixed-shape
    is_croppable = True

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.keys)  # every layer attends to every cached position

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1  # no maximum: the buffers grow

    def crop(self, max_length: int) -> None:
        """transformers' semantics: 0 or a negative value drops that many positions (5.x), a positive one keeps the
        first max_length positions (4.x)."""
        if max_length <= 0:
            max_length = self.length + max_length
        if max_length < self.length:
            super().crop(max(max_length, 0))

    def activate_past_recording(self) -> None:
        """Nothing to record: crop() can always roll back (the buffers hold every position)."""

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.reorder(beam_idx.to(self.keys[0].device))

    def to_legacy_cache(self):
        return self.to_legacy()


register_pytree(GenerationCache)


def _layer_tensors(layer) -> tuple:
    """(keys, values) of one transformers cache layer as [B, S, A] (heads folded into the width)."""

    def folded(t):
        return t if t.dim() == 3 else t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)  # [B, H, S, D]

    return folded(layer.keys), folded(layer.values)


def as_molm_cache(past, config):
    """The cache the model was given, in molm's form: None, molm's cache or the legacy tuple (converted inside the
    forward), or a transformers DynamicCache (an empty one, as generate creates, becomes a fresh molm cache; a filled
    one is copied into one). Other transformers caches (static, sliding-window, quantized, offloaded) are refused:
    ModuleFormer keeps one tensor per layer for K = V, which their layouts cannot hold."""
    if past is None or isinstance(past, (KVCache, tuple, list)):
        return past
    if isinstance(past, DynamicCache) and type(past).__name__ == "DynamicCache":
        if past.get_seq_length() == 0:
            return None
        legacy = tuple(_layer_tensors(layer) for layer in past.layers)
        if len(legacy) != config.n_layer:
            raise ValueError(f"the DynamicCache holds {len(legacy)} layers, the model has n_layer={config.n_layer}")
        return GenerationCache.from_legacy(legacy, config.identity_kv)
    raise TypeError(
        f"ModuleFormer cannot use a transformers {type(past).__name__}: it keeps its own cache (one "
        "tensor per layer when K = V). Pass the cache this model returned, a DynamicCache, a tuple of "
        "(K, V) per layer, or nothing"
    )


def _pick_cache(past_key_values, cache):
    return cache if cache is not None else past_key_values


class ModuleFormerPreTrainedModel(PreTrainedModel):
    config_class = ModuleFormerConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # The loss is the mean over this batch's tokens (plus the aux loss), so Trainer scales it for gradient
    # accumulation itself (forward takes no loss kwargs such as num_items_in_batch).
    accepts_loss_kwargs = False
    _no_split_modules = ["Block", "ModuleFormerBlock"]
    # the original's attention buffers: stored in MoLM checkpoints, never read
    _keys_to_ignore_on_load_unexpected = [r"attn\.mask", r"attn\.cum_weight"]

    def __init__(self, config: ModuleFormerConfig, backend: str | None = None):
        super().__init__(config)
        self.set_backend(backend or molm_model.default_backend())

    def set_backend(self, backend: str):
        """'extension' (molm's kernels) or 'reference' (pure torch), for this model and the base model inside."""
        ops = backend_ops(backend)
        for module in self.modules():
            if isinstance(module, ModuleFormerPreTrainedModel):
                module._ops, module.backend = ops, backend
        bind_backend(self, ops)
        return self

    def _init_weights(self, module):
        molm_model.init_module(module, self.config.initializer_range)

    def get_input_embeddings(self):
        return molm_model.trunk_of(self).wte

    def set_input_embeddings(self, value):
        molm_model.trunk_of(self).wte = value

    def _return_dict(self, return_dict) -> bool:
        if return_dict is None:
            return getattr(self.config, "use_return_dict", getattr(self.config, "return_dict", True))
        return return_dict

    def _output(self, out, return_dict) -> ModelOutput | tuple:
        output = ModuleFormerOutput(
            loss=out.loss,
            logits=out.logits,
            aux_loss=out.aux_loss,
            hidden_states=out.hidden_states,
            **{CACHE_NAME: out.past_key_values},
        )
        return output if self._return_dict(return_dict) else output.to_tuple()

    def _output_hidden_states(self, output_hidden_states, output_attentions) -> bool:
        """Resolves the two flags against the config; attention weights cannot be returned."""
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if output_attentions:
            raise ValueError(
                "ModuleFormer cannot return attention weights (output_attentions=True): its "
                "stick-breaking attention never materialises them; pass output_attentions=False"
            )
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        return bool(output_hidden_states)

    def _use_cache(self, use_cache) -> bool:
        return bool(self.config.use_cache) if use_cache is None and not self.training else bool(use_cache)

    def _cache_for(self, past, use_cache: bool, input_ids, inputs_embeds):
        """The cache to run with: the given one in molm's form, or a new GenerationCache when one is wanted (so the
        returned cache is one generate can continue from)."""
        past = as_molm_cache(past, self.config)
        if past is None and use_cache:
            batch, length = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
            past = GenerationCache.for_model(self, batch, length)
        return past


class ModuleFormerBlock(GradientCheckpointingLayer, Block):
    """molm's block as a transformers GradientCheckpointingLayer: gradient_checkpointing_enable() sets its flag and
    it checkpoints itself (so every_n_layers and the checkpointing kwargs apply per block)."""


class ModuleFormerModel(ModuleFormerPreTrainedModel):
    """The trunk alone (AutoModel): embeddings, blocks and the final LayerNorm, with the original's keys under the
    `transformer.` prefix of the heads' checkpoints (base_model_prefix)."""

    def __init__(self, config: ModuleFormerConfig, backend: str | None = None):
        super().__init__(config, backend)
        molm_model.add_trunk_modules(self, config.to_molm(), ModuleFormerBlock)
        self.set_backend(self.backend)  # binds the Linears built above
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        past_key_values=None,
        cache=None,
        use_cache=None,
        token_type_ids=None,
        inputs_embeds=None,
        output_hidden_states=None,
        output_attentions=None,
        return_dict=None,
        return_aux_loss: bool = False,
        position_ids=None,
        cache_position=None,
    ) -> ModelOutput | tuple:
        """-> last_hidden_state [B, T, C] (after ln_f), the cache, all hidden states, the routers' aux loss
        (return_aux_loss=True). position_ids and cache_position are accepted and ignored: no positions."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("ModuleFormer needs input_ids or inputs_embeds")
        use_cache = self._use_cache(use_cache)
        past = self._cache_for(_pick_cache(past_key_values, cache), use_cache, input_ids, inputs_embeds)
        hidden, aux, past, states = molm_model.run_trunk(
            self,
            input_ids,
            attention_mask,
            past,
            use_cache,
            token_type_ids,
            return_aux_loss,
            inputs_embeds,
            self._output_hidden_states(output_hidden_states, output_attentions),
        )
        output = ModuleFormerModelOutput(
            last_hidden_state=hidden, hidden_states=states, aux_loss=aux, **{CACHE_NAME: past}
        )
        return output if self._return_dict(return_dict) else output.to_tuple()


class ModuleFormerForCausalLM(ModuleFormerPreTrainedModel, GenerationMixin):
    def __init__(self, config: ModuleFormerConfig, backend: str | None = None):
        super().__init__(config, backend)
        self.transformer = ModuleFormerModel(config, self.backend)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.set_backend(self.backend)  # binds the Linears built above
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        past_key_values=None,
        cache=None,
        use_cache=None,
        token_type_ids=None,
        return_aux_loss: bool = True,
        logits_to_keep: int = 0,
        return_dict=None,
        output_hidden_states=None,
        output_attentions=None,
        inputs_embeds=None,
        position_ids=None,
        cache_position=None,
        shift_labels=None,
    ) -> ModelOutput | tuple:
        """Like molm's forward; `past_key_values` / `cache` is molm's cache, the legacy tuple or a DynamicCache (see
        as_molm_cache). position_ids and cache_position are accepted and ignored: the model has no positions."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("ModuleFormer needs input_ids or inputs_embeds")
        use_cache = self._use_cache(use_cache)
        past = self._cache_for(_pick_cache(past_key_values, cache), use_cache, input_ids, inputs_embeds)
        out = molm_model.causal_lm_forward(
            self,
            input_ids,
            attention_mask,
            labels,
            past,
            use_cache,
            token_type_ids,
            return_aux_loss,
            logits_to_keep,
            self._output_hidden_states(output_hidden_states, output_attentions),
            inputs_embeds,
            shift_labels=shift_labels,
        )
        return self._output(out, return_dict)

    def generate(self, *args, **kwargs):
        """transformers' generate; the decoding strategies this cache cannot serve are refused up front."""
        config = kwargs.get("generation_config") or self.generation_config
        implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
        if implementation not in (None, "dynamic", "dynamic_full"):  # dynamic_full: what 4.5x gives an assistant
            raise ValueError(
                f"ModuleFormer cannot generate with cache_implementation={implementation!r}: it keeps "
                "its own cache (one tensor per layer when K = V, grown as needed); leave "
                "cache_implementation unset"
            )
        penalty_alpha = kwargs.get("penalty_alpha", getattr(config, "penalty_alpha", None))
        top_k = kwargs.get("top_k", getattr(config, "top_k", None))
        if penalty_alpha and top_k and top_k > 1:
            raise ValueError(
                "ModuleFormer does not support contrastive search (penalty_alpha > 0 with top_k > 1); "
                "use greedy, sampling, beam search, or assisted / prompt-lookup decoding"
            )
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=None,
        cache=None,
        attention_mask=None,
        token_type_ids=None,
        use_cache=True,
        inputs_embeds=None,
        next_sequence_length=None,
        is_first_iteration=None,
        position_ids=None,
        cache_position=None,
        logits_to_keep=None,
        **kwargs,
    ):
        """Feed only the positions the cache has not seen (attention_mask stays full length: past + new); the first
        step reserves room for the whole generation. Other keyword arguments are passed on to forward, as
        transformers' own models do."""
        past = as_molm_cache(_pick_cache(past_key_values, cache), self.config)
        seen = 0
        if past is not None:
            seen = past.length if isinstance(past, KVCache) else (past[0][0].shape[1] if past else 0)
        elif use_cache:
            max_length = getattr(getattr(self, "generation_config", None), "max_length", None) or 0
            total = attention_mask.shape[1] if attention_mask is not None else input_ids.shape[1]
            past = GenerationCache.for_model(self, input_ids.shape[0], max(total, max_length))
        if inputs_embeds is not None and seen < inputs_embeds.shape[1]:  # prompt embeddings the cache has not seen
            input_ids, inputs_embeds = None, inputs_embeds[:, seen:]
        else:
            inputs_embeds = None
            # how many positions are new: transformers 5.x says so; else count from the full-length mask (with a
            # prompt given as embeddings, input_ids holds only the generated tokens), else from input_ids
            if next_sequence_length is not None:
                new = next_sequence_length
            elif attention_mask is not None:
                new = attention_mask.shape[1] - seen
            else:
                new = input_ids.shape[1] - seen
            input_ids = input_ids[:, -new:] if new > 0 else input_ids[:, input_ids.shape[1] :]
            if token_type_ids is not None:
                token_type_ids = token_type_ids[:, -input_ids.shape[1] :]
        inputs = {
            "input_ids": input_ids,
            "inputs_embeds": inputs_embeds,
            CACHE_NAME: past,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "use_cache": use_cache,
            "return_aux_loss": False,
            "logits_to_keep": 1 if logits_to_keep is None else logits_to_keep,
        }
        for key, value in kwargs.items():  # e.g. output_hidden_states, return_dict, a user's extra forward kwargs
            inputs.setdefault(key, value)
        return inputs

    @staticmethod
    def _reorder_cache(past, beam_idx: torch.Tensor):
        """Beam search: keep the cache rows of the surviving beams."""
        if isinstance(past, KVCache):
            past.reorder(beam_idx.to(past.keys[0].device))
            return past
        return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past)


class ModuleFormerForSequenceClassification(ModuleFormerPreTrainedModel):
    """Scores every position and pools the rightmost token that is not config.pad_token_id (either padding
    side); given inputs_embeds (no ids to compare), the rightmost position the attention_mask keeps."""

    def __init__(self, config: ModuleFormerConfig, backend: str | None = None):
        super().__init__(config, backend)
        self.transformer = ModuleFormerModel(config, self.backend)
        self.score = Linear(config.n_embd, config.num_labels, bias=False)
        self.set_backend(self.backend)  # binds the Linears built above
        self.post_init()

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        self.config.num_labels = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        past_key_values=None,
        cache=None,
        use_cache=None,
        token_type_ids=None,
        return_aux_loss: bool = True,
        return_dict=None,
        output_hidden_states=None,
        output_attentions=None,
        inputs_embeds=None,
        position_ids=None,
    ) -> ModelOutput | tuple:
        if input_ids is None and inputs_embeds is None:
            raise ValueError("ModuleFormer needs input_ids or inputs_embeds")
        use_cache = bool(use_cache)
        past = self._cache_for(_pick_cache(past_key_values, cache), use_cache, input_ids, inputs_embeds)
        out = molm_model.sequence_classification_forward(
            self,
            input_ids,
            attention_mask,
            labels,
            past,
            use_cache,
            token_type_ids,
            return_aux_loss,
            self._output_hidden_states(output_hidden_states, output_attentions),
            inputs_embeds,
        )
        return self._output(out, return_dict)


# The model has no token types: a tokenizer must not emit token_type_ids (the original would add them to the
# token embeddings).
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def molm_tokenizer():
    """MoLM's tokenizer as a transformers `PreTrainedTokenizerFast`, built offline (see molm.tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    from .tokenizer import EOS, build_molm_tokenizer

    return PreTrainedTokenizerFast(
        tokenizer_object=build_molm_tokenizer(),
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_input_names=MODEL_INPUT_NAMES,
    )


def register() -> None:
    """Register with the Auto* classes (idempotent; the original README's own register calls also still work)."""
    AutoConfig.register(ModuleFormerConfig.model_type, ModuleFormerConfig, exist_ok=True)
    AutoModel.register(ModuleFormerConfig, ModuleFormerModel, exist_ok=True)
    AutoModelForCausalLM.register(ModuleFormerConfig, ModuleFormerForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(
        ModuleFormerConfig, ModuleFormerForSequenceClassification, exist_ok=True
    )


register()

__all__ = [
    "ModuleFormerConfig",
    "ModuleFormerModel",
    "ModuleFormerForCausalLM",
    "ModuleFormerForSequenceClassification",
    "ModuleFormerPreTrainedModel",
    "GenerationCache",
    "molm_tokenizer",
    "register",
]
