"""molm: a fast, faithful ModuleFormer / MoLM implementation (IBM's sparse mixture-of-modules language models)."""

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

__version__ = "0.3.0"
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
