"""int8 weight-only quantization: the expert weights and lm_head stored as int8 with one fp32 scale per output
channel (symmetric, round to nearest: w ~= q * scale, |q| <= 127), activations in the model dtype.

These are the bytes a decode step streams (the k chosen experts of every MoE site and the vocabulary projection),
so int8 halves them against bf16. Routers, norms, K/V projections and the embedding stay in the model dtype.

A quantized model saves and loads like any other: the int8 tensors keep their keys (`...experts.weight`,
`lm_head.weight`), each gets a `<key>_scale` beside it, and config.json records `"quantization"`. Expert weights are
stored transposed, as output rows [E, out, in] (the float layout is [E, in, out]), so that a decode step streams
each row contiguously.
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import Linear, ParallelExperts

METHODS = ("int8",)
QMAX = 127


def quantize_tensor(weight: torch.Tensor, reduce_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8: the scale is max |w| / 127 over `reduce_dim` (the input dimension), computed in
    fp32; all-zero channels get scale 1 (and q = 0)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=reduce_dim, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale), -QMAX, QMAX).to(torch.int8)
    return q, scale.squeeze(reduce_dim)


class _Int8Weights(nn.Module):
    """int8 `weight` and fp32 `weight_scale` buffers; the scale stays fp32 when the model is cast to another dtype."""

    def _apply(self, fn, recurse=True):
        scale = self._buffers.pop("weight_scale")
        super()._apply(fn, recurse)
        moved = fn(scale)  # where the model went; the values are taken from the fp32 original
        self._buffers["weight_scale"] = scale.to(moved.device)
        return self


class QuantizedExperts(_Int8Weights):
    """ParallelExperts with int8 weights stored as output rows [E, out, in] (a decode step streams contiguous
    rows) and scales [E, out]."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.float())

    @classmethod
    def empty(cls, num_experts: int, input_size: int, output_size: int) -> "QuantizedExperts":
        return cls(
            torch.zeros(num_experts, output_size, input_size, dtype=torch.int8), torch.ones(num_experts, output_size)
        )

    def forward(self, kernel):
        """kernel(weight, scale), as ParallelExperts.forward: the fused MoE ops take the int8 weight with its scale."""
        return kernel(self.weight, self.weight_scale)

    def extra_repr(self) -> str:
        e, o, i = self.weight.shape
        return f"num_experts={e}, input_size={i}, output_size={o}, int8"


class QuantizedLinear(_Int8Weights):
    """A bias-free or biased linear map with int8 weights [out, in] and scales [out]."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel = None  # bound by set_backend

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> "QuantizedLinear":
        b = torch.zeros(out_features, dtype=dtype) if bias else None
        return cls(torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(out_features), b)

    def bind_ops(self, ops) -> None:
        self.kernel = ops.linear_q8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError("QuantizedLinear is not bound to a backend: call model.set_backend(...)")
        return self.kernel(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the modules `quantize` replaces: every expert tensor and the LM head."""
    names = [n for n, m in model.named_modules() if isinstance(m, ParallelExperts)]
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        names.append("lm_head")
    return names


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, _Int8Weights) for m in model.modules())


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize(model: nn.Module, method: str = "int8") -> nn.Module:
    """Quantize `model` in place (and return it): expert weights and lm_head become int8 with per-output-channel
    scales. The model must be a molm causal LM or classifier in fp32/bf16/fp16; it stays in eval use only (its
    int8 weights cannot be trained)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; molm supports {METHODS}")
    if is_quantized(model):
        raise ValueError("the model is already quantized (int8); quantize a model loaded in fp32/bf16/fp16")
    with torch.no_grad():
        for name in quantized_modules(model):
            module = model.get_submodule(name)
            if isinstance(module, ParallelExperts):  # [E, in, out] -> rows [E, out, in], one scale per (expert, out)
                q, scale = quantize_tensor(module.weight.transpose(1, 2), reduce_dim=2)
                _set(model, name, QuantizedExperts(q.contiguous(), scale))
            else:  # nn.Linear [out, in]: one scale per output row
                q, scale = quantize_tensor(module.weight, reduce_dim=1)
                _set(model, name, QuantizedLinear(q, scale, module.bias))
    model.config.quantization = {"method": method, "modules": "experts+lm_head"}
    if hasattr(model, "set_backend"):
        model.set_backend(model.backend)
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Replace the int8 modules by ordinary ones holding q * scale in the model dtype (for training, extend, prune)."""
    dtype = model.transformer.wte.weight.dtype
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedExperts):
                e, o, i = module.weight.shape
                experts = ParallelExperts(e, i, o).to(device=module.weight.device, dtype=dtype)
                experts.weight.copy_((module.weight.float() * module.weight_scale[:, :, None]).transpose(1, 2))
                _set(model, name, experts)
            elif isinstance(module, QuantizedLinear):
                linear = Linear(module.in_features, module.out_features, bias=module.bias is not None)
                linear = linear.to(device=module.weight.device, dtype=dtype)
                linear.weight.copy_(module.weight.float() * module.weight_scale[:, None])
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
                _set(model, name, linear)
    model.config.quantization = None
    if hasattr(model, "set_backend"):
        model.set_backend(model.backend)
    return model


def prepare_for_checkpoint(model: nn.Module, quantization: dict | None) -> None:
    """Before loading a quantized checkpoint into a freshly built (meta) model: swap in empty int8 modules so the
    int8 tensors and their scales have somewhere to go."""
    if not quantization:
        return
    method = quantization.get("method") if isinstance(quantization, dict) else None
    if method not in METHODS:
        raise ValueError(f"config.json: unknown quantization {quantization!r}; molm supports methods {METHODS}")
    dtype = model.transformer.wte.weight.dtype
    for name in quantized_modules(model):
        module = model.get_submodule(name)
        if isinstance(module, ParallelExperts):
            _set(model, name, QuantizedExperts.empty(*module.weight.shape))  # (E, in, out) of the float module
        else:
            _set(
                model,
                name,
                QuantizedLinear.empty(module.in_features, module.out_features, module.bias is not None, dtype),
            )


def require_float_weights(model: nn.Module, what: str) -> None:
    """A clear error for operations that need trainable float weights."""
    if is_quantized(model):
        raise ValueError(
            f"{what} needs float weights, but the model is quantized (int8): call "
            "molm.dequantize(model) first, or load the original checkpoint"
        )
