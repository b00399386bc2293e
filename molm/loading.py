"""`molm.load`: a checkpoint directory (or hub id) as the molm class its config.json names. Reading and writing
the files is molm/checkpoint.py's job; this module only knows the model classes."""

from __future__ import annotations

import os

import torch

from . import checkpoint
from .checkpoint import CheckpointError, save_pretrained  # noqa: F401  (molm.save_pretrained)
from .config import ModuleFormerConfig
from .model import ARCHITECTURES, ModuleFormerPreTrainedModel


def model_class(config: ModuleFormerConfig, config_path: str) -> type[ModuleFormerPreTrainedModel]:
    """The class config.json names in `architectures` (causal LM when it names none)."""
    name = (config.architectures or ["ModuleFormerForCausalLM"])[0]
    if name not in ARCHITECTURES:
        raise CheckpointError(f"{config_path}: unknown architecture {name!r}; molm knows {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    cls: type[ModuleFormerPreTrainedModel] | None = None,
    progress: bool = False,
    quantize: str | None = None,
) -> ModuleFormerPreTrainedModel:
    """Load an HF-format ModuleFormer directory (or hub id) as the class named in `architectures`.

    dtype=None keeps the stored dtype (bf16 for the released MoLM models); pass torch.float32 to upcast as
    transformers' from_pretrained does by default. `cls` forces a head (a causal-LM checkpoint loaded as a
    classifier gets a freshly initialised `score`, as in the original). quantize="int8" quantizes the experts and
    lm_head after loading (molm.quantize); a checkpoint saved quantized loads as such without it.
    """
    return checkpoint.load(
        path,
        dtype=dtype,
        device=device,
        backend=backend,
        cls=cls,
        progress=progress,
        quantize=quantize,
        architectures=ARCHITECTURES,
    )
