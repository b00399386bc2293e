"""`import moduleformer`: the name of the original package, as a thin alias of molm's transformers adapter."""

from molm.hf import (
    ModuleFormerConfig,
    ModuleFormerForCausalLM,
    ModuleFormerForSequenceClassification,
    ModuleFormerPreTrainedModel,
    molm_tokenizer,
    register,
)

__all__ = [
    "ModuleFormerConfig",
    "ModuleFormerForCausalLM",
    "ModuleFormerForSequenceClassification",
    "ModuleFormerPreTrainedModel",
    "molm_tokenizer",
    "register",
]
