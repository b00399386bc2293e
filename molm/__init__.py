"""molm: a fast, faithful ModuleFormer / MoLM implementation (IBM's sparse mixture-of-modules language models)."""

import os as _os
import sys as _sys

# OpenMP workers that spin between parallel regions take the CPU from the thread they are waiting for when the
# machine is busy: a tiny ATen op (the routers' GELU opens a parallel region at any size) then waits milliseconds for
# a descheduled worker. libgomp reads its wait policy once, when torch loads it, so when molm is imported first (the
# `molm` command and server always are) idle OpenMP workers sleep instead of spinning; an explicit setting wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cache import KVCache
from .config import PRESETS, ModuleFormerConfig
from .evaluate import perplexity_of_stream as perplexity
from .generate import generate, generate_ids
from .loading import CheckpointError, load, save_pretrained
from .model import ModelOutput, ModuleFormerForCausalLM, ModuleFormerForSequenceClassification, ModuleFormerModel
from .quantization import dequantize, quantize
from .surgery import extend, prune
from .tokenizer import load_tokenizer
from .train import TrainConfig, train
from .usage import ExpertUsage, expert_usage, plot_usage

__version__ = "0.4.4"
__all__ = [
    "KVCache",
    "PRESETS",
    "ModuleFormerConfig",
    "CheckpointError",
    "generate",
    "generate_ids",
    "load",
    "load_tokenizer",
    "save_pretrained",
    "ModelOutput",
    "ModuleFormerForCausalLM",
    "ModuleFormerForSequenceClassification",
    "ModuleFormerModel",
    "extend",
    "prune",
    "quantize",
    "dequantize",
    "TrainConfig",
    "perplexity",
    "train",
    "ExpertUsage",
    "expert_usage",
    "plot_usage",
]
