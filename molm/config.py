"""ModuleFormerConfig: every field of the original config, validation, MoLM presets and the HF json round trip."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

MODEL_TYPE = "moduleformer"
# config.json's torch_dtype names (and the --dtype choices) -> torch dtypes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {"auto": None, **DTYPES}  # what a user may ask a model to load as; auto: as stored
# HF attribute_map of the original: alias -> field
ALIASES = {
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
}
GATE_TYPES = ("mlp", "linear", "gmm")
# Fields that fix tensor shapes: a config.json without them cannot describe a checkpoint.
REQUIRED_FIELDS = (
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "att_hidden",
    "ffd_hidden",
    "gating_size",
    "n_att_experts",
    "k_att",
    "n_mlp_experts",
    "k_mlp",
)
# Anything above these is surely a corrupt or hostile config; refuse before allocating.
SANE_LIMITS = {
    "vocab_size": 4_000_000,
    "n_embd": 65_536,
    "n_layer": 1_024,
    "n_head": 4_096,
    "att_hidden": 65_536,
    "ffd_hidden": 262_144,
    "gating_size": 65_536,
    "n_att_experts": 65_536,
    "n_mlp_experts": 65_536,
}


@dataclass
class ModuleFormerConfig:
    vocab_size: int = 50295
    block_size: int = 512
    history_length: int = 512
    n_embd: int = 1024
    n_layer: int = 24
    n_head: int = 8
    att_hidden: int = 512
    ffd_hidden: int = 2048
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    moe_pdrop: float = 0.0
    sample_topk: int = 0
    gating_size: int = 256
    n_att_experts: int = 32
    k_att: int = 2
    n_mlp_experts: int = 32
    k_mlp: int = 2
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    aux_loss_type: str = "mi"
    aux_loss_weight: float = 0.0
    gate_type: str = "mlp"
    architectures: list[str] | None = None
    torch_dtype: str | None = None
    num_labels: int | None = None
    problem_type: str | None = None
    # {"method": "int8", ...} for a checkpoint written by molm.quantize (molm/quantization.py); None: float weights
    quantization: dict[str, Any] | None = None
    # keys the code does not use (att_func, moe_type, id2label, transformers_version, ...) kept verbatim
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # --- derived sizes -------------------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return self.att_hidden // self.n_head

    @property
    def identity_kv(self) -> bool:
        """MoLM's case: K = V = ln_1 output, no key/value weights."""
        return self.n_head == 1 and self.att_hidden == self.n_embd

    @property
    def n_ctx(self) -> int:
        return self.history_length * self.n_layer

    @property
    def max_position_embeddings(self) -> int:
        # The original never sets n_positions, so probing it raised. The model has no positional encoding and
        # was trained on history_length + block_size tokens; longer inputs run but are untested.
        return self.history_length + self.block_size

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    # --- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        for name, limit in SANE_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"config field {name!r} must be an integer, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"config field {name!r} must be >= 1, got {value}")
            if value > limit:
                raise ValueError(
                    f"config field {name!r} = {value} exceeds the sane limit {limit}; "
                    "the config is corrupt or not a ModuleFormer config"
                )
        if self.att_hidden % self.n_head:
            raise ValueError(f"config: att_hidden ({self.att_hidden}) must be divisible by n_head ({self.n_head})")
        for k_name, e_name in (("k_att", "n_att_experts"), ("k_mlp", "n_mlp_experts")):
            k, e = getattr(self, k_name), getattr(self, e_name)
            if not isinstance(k, int) or not 1 <= k <= e:
                raise ValueError(f"config: {k_name} ({k}) must be between 1 and {e_name} ({e})")
        if not 0 <= self.sample_topk <= min(self.k_att, self.k_mlp):
            raise ValueError(f"config: sample_topk ({self.sample_topk}) must be between 0 and min(k_att, k_mlp)")
        if self.gate_type not in GATE_TYPES:
            raise ValueError(f"config: gate_type must be one of {GATE_TYPES}, got {self.gate_type!r}")
        if self.activation_function != "gelu_new":
            raise ValueError(
                f"config: activation_function {self.activation_function!r} is not supported (MoLM uses 'gelu_new')"
            )
        if self.tie_word_embeddings:
            raise ValueError("config: tie_word_embeddings=True is not supported (MoLM's lm_head is untied)")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "moe_pdrop"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"config: {name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise ValueError(f"config: {name} must be a non-negative integer or null, got {value!r}")

    # --- HF json round trip --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModuleFormerConfig":
        if not isinstance(data, dict):
            raise TypeError(f"config must be a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"unknown model_type {model_type!r}: molm loads only {MODEL_TYPE!r} checkpoints")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs, extra = {}, {}
        for key, value in data.items():
            key = ALIASES.get(key, key)
            if key in names:
                kwargs[key] = value
            elif key not in ("model_type", "n_ctx", "max_position_embeddings"):
                extra[key] = value
        if "id2label" in data and kwargs.get("num_labels") is None:
            kwargs["num_labels"] = len(data["id2label"])
        missing = [key for key in REQUIRED_FIELDS if key not in kwargs]
        if missing:
            raise ValueError(f"config is missing the required field(s) {missing}: these fix the tensor shapes")
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key in ("architectures", "torch_dtype", "num_labels", "problem_type", "pad_token_id", "quantization"):
            if data[key] is None:
                del data[key]
        data.update(self.extra)
        data["model_type"] = MODEL_TYPE
        data["n_ctx"] = self.n_ctx
        return dict(sorted(data.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModuleFormerConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModuleFormerConfig":
        path = os.fspath(path)
        return cls.from_json_file(os.path.join(path, "config.json") if os.path.isdir(path) else path)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def replace(self, **changes) -> "ModuleFormerConfig":
        return dataclasses.replace(self, **changes)


def _molm(n_layer: int, k: int) -> ModuleFormerConfig:
    return ModuleFormerConfig(
        n_layer=n_layer,
        n_head=1,
        att_hidden=1024,
        n_att_experts=16,
        k_att=k,
        n_mlp_experts=32,
        k_mlp=k,
        architectures=["ModuleFormerForCausalLM"],
        extra={"att_func": "stickbreaking", "local_size": 1, "moe_type": "moe", "universal": False, "world_size": None},
    )


# The three released models (docs/model.md §1; 700M-8B read from its config.json, the 4B ones inferred).
PRESETS = {
    "MoLM-350M-4B": lambda: _molm(24, 2),
    "MoLM-700M-4B": lambda: _molm(24, 4),
    "MoLM-700M-8B": lambda: _molm(48, 2),
}
