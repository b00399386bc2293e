"""Hugging Face transformers adapter (optional extra `molm[hf]`): ModuleFormer as `PreTrainedModel`s.

The classes are molm's model as a transformers model: they own `transformer` (molm's trunk) and the head
(`lm_head` / `score`) directly, with the original's state_dict keys, and run molm's own forward functions on
them (same kernels), reading the live `config` and modules at every call. So `from_pretrained`,
`save_pretrained`, `generate` (greedy, sampling, beam search), `resize_token_embeddings`, Trainer, PEFT (LoRA on
any nn.Linear, `target_parameters` on the expert weights, `modules_to_save`) and the Auto* classes work on
transformers 4.4x and 5.x. Importing this module registers the classes with AutoConfig / AutoModelForCausalLM /
AutoModelForSequenceClassification.

Generation keeps molm's static `KVCache` instead of a transformers `Cache`: the model opts out of the default
dynamic cache, slices the prompt itself in `prepare_inputs_for_generation`, returns the cache under the name this
transformers version reads back (`past_key_values` in 4.x, `cache` in late 5.x) and reorders it for beam search.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationMixin,
                          PretrainedConfig, PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from . import config as molm_config
from . import model as molm_model
from .cache import KVCache
from .modules import Linear, backend_ops, bind_backend

# Fields that PretrainedConfig owns itself (token ids, labels, dtype, ...): passed to its __init__, not set here.
_HF_OWNED = {"bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "architectures", "torch_dtype",
             "num_labels", "problem_type", "use_cache", "extra"}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(molm_config.ModuleFormerConfig) if f.name not in _HF_OWNED}


class ModuleFormerConfig(PretrainedConfig):
    """The original's config class: every molm.ModuleFormerConfig field as an attribute (+ HF's own)."""

    model_type = molm_config.MODEL_TYPE
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = dict(molm_config.ALIASES)  # hidden_size -> n_embd, ...

    def __init__(self, bos_token_id=50256, eos_token_id=50256, pad_token_id=None, tie_word_embeddings=False,
                 use_cache=True, **kwargs):
        for name, default in _DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        kwargs.pop("n_ctx", None)  # derived: history_length * n_layer (the property below)
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
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
            **fields, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id, tie_word_embeddings=bool(self.tie_word_embeddings),
            use_cache=bool(self.use_cache), architectures=self.architectures, num_labels=self.num_labels,
            problem_type=problem_type)


# transformers 5.x renamed the cache field of model outputs (and generate's kwarg) from past_key_values to cache,
# and refuses outputs that carry both names: use the one this version's own output classes use.
CACHE_NAME = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
ModuleFormerOutput = dataclasses.make_dataclass(
    "ModuleFormerOutput",
    [("loss", Optional[torch.Tensor], None), ("logits", Optional[torch.Tensor], None), (CACHE_NAME, Any, None),
     ("aux_loss", Optional[torch.Tensor], None), ("hidden_states", Optional[tuple], None)],
    bases=(ModelOutput,))
ModuleFormerOutput.__module__ = __name__


class ModuleFormerPreTrainedModel(PreTrainedModel):
    config_class = ModuleFormerConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # The loss is the mean over this batch's tokens (plus the aux loss), so Trainer scales it for gradient
    # accumulation itself (forward takes no loss kwargs such as num_items_in_batch).
    accepts_loss_kwargs = False
    _no_split_modules = ["Block"]
    # the original's attention buffers: stored in MoLM checkpoints, never read
    _keys_to_ignore_on_load_unexpected = [r"attn\.mask", r"attn\.cum_weight"]

    def __init__(self, config: ModuleFormerConfig, backend: str | None = None):
        super().__init__(config)
        self.set_backend(backend or molm_model.default_backend())
        self.transformer = molm_model.ModuleFormerModel(config.to_molm())

    def set_backend(self, backend: str):
        """'extension' (molm's kernels) or 'reference' (pure torch)."""
        self._ops = backend_ops(backend)
        self.backend = backend
        bind_backend(self, self._ops)
        return self

    def _init_weights(self, module):
        molm_model.init_module(module, self.config.initializer_range)

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def _output(self, out, return_dict) -> ModelOutput | tuple:
        output = ModuleFormerOutput(loss=out.loss, logits=out.logits, aux_loss=out.aux_loss,
                                    hidden_states=out.hidden_states, **{CACHE_NAME: out.past_key_values})
        if return_dict is None:
            return_dict = getattr(self.config, "use_return_dict", getattr(self.config, "return_dict", True))
        return output if return_dict else output.to_tuple()

    def _output_hidden_states(self, output_hidden_states, output_attentions) -> bool:
        """Resolves the two flags against the config; attention weights cannot be returned."""
        if output_attentions is None:
            output_attentions = getattr(self.config, "output_attentions", False)
        if output_attentions:
            raise ValueError("ModuleFormer cannot return attention weights (output_attentions=True): its "
                             "stick-breaking attention never materialises them; pass output_attentions=False")
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        return bool(output_hidden_states)


class GenerationCache(KVCache):
    """molm's KVCache with the method name transformers 4.4x calls on non-tuple caches in beam search."""

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.reorder(beam_idx.to(self.keys[0].device))


def _pick_cache(past_key_values, cache):
    return cache if cache is not None else past_key_values


class ModuleFormerForCausalLM(ModuleFormerPreTrainedModel, GenerationMixin):
    def __init__(self, config: ModuleFormerConfig, backend: str | None = None):
        super().__init__(config, backend)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.set_backend(self.backend)  # binds the Linears built above
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # molm keeps its own static KVCache (K = V stored once per layer)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, cache=None,
                use_cache=None, token_type_ids=None, return_aux_loss: bool = True, logits_to_keep: int = 0,
                return_dict=None, output_hidden_states=None, output_attentions=None, inputs_embeds=None,
                position_ids=None, cache_position=None) -> ModelOutput | tuple:
        """Like molm's forward; `past_key_values` / `cache` is a molm KVCache or the legacy tuple. position_ids and
        cache_position are accepted and ignored: the model has no positions."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("ModuleFormer needs input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None and not self.training else bool(use_cache)
        out = molm_model.causal_lm_forward(
            self, input_ids, attention_mask, labels, _pick_cache(past_key_values, cache), use_cache, token_type_ids,
            return_aux_loss, logits_to_keep, self._output_hidden_states(output_hidden_states, output_attentions),
            inputs_embeds)
        return self._output(out, return_dict)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, cache=None, attention_mask=None,
                                      token_type_ids=None, use_cache=True, **kwargs):
        """Feed only the tokens the cache has not seen; attention_mask stays full length (past + new)."""
        past = _pick_cache(past_key_values, cache)
        if past is not None:
            seen = past.length if isinstance(past, KVCache) else past[0][0].shape[1]
            input_ids = input_ids[:, seen:]
            if token_type_ids is not None:
                token_type_ids = token_type_ids[:, seen:]
        elif use_cache:  # first step: reserve room for the whole generation up front
            max_length = getattr(getattr(self, "generation_config", None), "max_length", None) or 0
            past = GenerationCache.for_model(self, input_ids.shape[0], max(input_ids.shape[1], max_length))
        return {"input_ids": input_ids, CACHE_NAME: past, "attention_mask": attention_mask,
                "token_type_ids": token_type_ids, "use_cache": use_cache, "return_aux_loss": False,
                "logits_to_keep": 1}

    @staticmethod
    def _reorder_cache(past, beam_idx: torch.Tensor):
        """Beam search: keep the cache rows of the surviving beams."""
        if isinstance(past, KVCache):
            past.reorder(beam_idx.to(past.keys[0].device))
            return past
        return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past)


class ModuleFormerForSequenceClassification(ModuleFormerPreTrainedModel):
    """Scores every position and pools the rightmost token that is not config.pad_token_id (either padding
    side)."""

    def __init__(self, config: ModuleFormerConfig, backend: str | None = None):
        super().__init__(config, backend)
        self.score = Linear(config.n_embd, config.num_labels, bias=False)
        self.set_backend(self.backend)  # binds the Linears built above
        self.post_init()

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        self.config.num_labels = value

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, cache=None,
                use_cache=None, token_type_ids=None, return_aux_loss: bool = True, return_dict=None,
                output_hidden_states=None, output_attentions=None, inputs_embeds=None,
                position_ids=None) -> ModelOutput | tuple:
        if input_ids is None:
            raise ValueError("ModuleFormerForSequenceClassification needs input_ids (to find the last token that "
                             "is not padding); inputs_embeds alone are not supported")
        if inputs_embeds is not None:
            raise ValueError("pass either input_ids or inputs_embeds, not both")
        out = molm_model.sequence_classification_forward(
            self, input_ids, attention_mask, labels, _pick_cache(past_key_values, cache), bool(use_cache),
            token_type_ids, return_aux_loss, self._output_hidden_states(output_hidden_states, output_attentions))
        return self._output(out, return_dict)


# The model has no token types: a tokenizer must not emit token_type_ids (the original would add them to the
# token embeddings).
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def molm_tokenizer():
    """MoLM's tokenizer as a transformers `PreTrainedTokenizerFast`, built offline (see molm.tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    from .tokenizer import EOS, build_molm_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=build_molm_tokenizer(), bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=EOS, model_input_names=MODEL_INPUT_NAMES)


def register() -> None:
    """Register with the Auto* classes (idempotent; the original README's own register calls also still work)."""
    AutoConfig.register(ModuleFormerConfig.model_type, ModuleFormerConfig, exist_ok=True)
    AutoModelForCausalLM.register(ModuleFormerConfig, ModuleFormerForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(ModuleFormerConfig, ModuleFormerForSequenceClassification,
                                                exist_ok=True)


register()

__all__ = ["ModuleFormerConfig", "ModuleFormerForCausalLM", "ModuleFormerForSequenceClassification",
           "ModuleFormerPreTrainedModel", "molm_tokenizer", "register"]
