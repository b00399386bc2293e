"""Read and write Hugging Face-format ModuleFormer directories (molm.load picks the model class: molm/loading.py).

Reads `pytorch_model.bin` (weights_only, memory-mapped), sharded `.bin` + index, `model.safetensors` and sharded
safetensors + index. The model is built on the meta device and each tensor is converted and assigned as it is
read, so a checkpoint never sits in memory twice. Writes config.json + (sharded) safetensors with the original
key names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zipfile
from collections.abc import Iterator

import torch

from . import quantization as quant
from .config import DTYPES, ModuleFormerConfig

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Persistent buffers of the original attention: never read by its forward; accepted and dropped.
UNUSED_KEYS = re.compile(r"^transformer\.h\.\d+\.attn\.(mask|cum_weight)$")
SMALL_MODEL = 2**26  # parameters; below this a config/weights mismatch is reported key by key
# transformers' `trust_remote_code` entry point written next to the weights: config.json's auto_map names its classes,
# which it imports from the installed molm package, so stock tools (`lm_eval --model hf`) load the directory.
AUTO_MODULE = "moduleformer_auto"
AUTO_MAP = {
    "AutoConfig": f"{AUTO_MODULE}.ModuleFormerConfig",
    "AutoModelForCausalLM": f"{AUTO_MODULE}.ModuleFormerForCausalLM",
    "AutoModelForSequenceClassification": f"{AUTO_MODULE}.ModuleFormerForSequenceClassification",
}
AUTO_MODULE_SOURCE = '''"""Lets transformers load this directory with trust_remote_code=True (and tools built on it,
such as `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`). The classes come from the installed
molm package (pip install "molm[hf]"); this file defines nothing else."""

from moduleformer import ModuleFormerConfig, ModuleFormerForCausalLM, ModuleFormerForSequenceClassification

__all__ = ["ModuleFormerConfig", "ModuleFormerForCausalLM", "ModuleFormerForSequenceClassification"]
'''
# Files a tokenizer may consist of; save_pretrained copies them next to the weights (and generation settings).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded; the message names the file and the problem."""


def resolve(path: str | os.PathLike) -> str:
    """A local directory, or a hub id resolved through huggingface_hub when it is installed and reachable."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file: pass the model directory that holds config.json and the weights")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(
                f"{path!r} is not a local directory and huggingface_hub is not installed: "
                "download the model and pass its local directory"
            ) from None
        try:
            return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"])
        except Exception as exc:  # network errors, missing repos, auth: all end the same way for the user
            raise CheckpointError(
                f"could not fetch {path!r} from the Hugging Face hub ({type(exc).__name__}: "
                f"{exc}); pass a local directory instead"
            ) from exc
    raise CheckpointError(f"model directory {path!r} does not exist")


def _allowed_roots(directory: str) -> list[str]:
    """Where the weight files of `directory` may live: the directory itself and, for a Hugging Face cache snapshot
    (<cache>/models--org--name/snapshots/<revision>, whose files are links into ../../blobs), that repo's blobs."""
    root = os.path.realpath(directory)
    roots = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":
        roots.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    return roots


def _weight_path(directory: str, name: str, source: str) -> str:
    """A weight file named in an index (or a single weights file) must be a plain file inside the directory: no
    '..', no absolute path, no link out of it (links into the HF cache's blobs are fine)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise CheckpointError(f"{source}: shard name {name!r} points outside the model directory")
    full = os.path.join(directory, name)
    real = os.path.realpath(full)
    if not any(real.startswith(root + os.sep) for root in _allowed_roots(directory)):
        raise CheckpointError(f"{source}: weights file {name!r} resolves outside the model directory (to {real})")
    if not os.path.isfile(full):
        raise CheckpointError(f"{source}: shard {name!r} is missing")
    return full


def weight_files(directory: str) -> list[str]:
    """The weight files of a directory, safetensors preferred."""
    for single, index in ((SAFE_SINGLE, SAFE_INDEX), (BIN_SINGLE, BIN_INDEX)):
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: not a valid index ({exc!r})") from exc
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: weight_map must be an object")
            for name in weight_map.values():
                if not isinstance(name, str):
                    raise CheckpointError(f"{index_path}: shard name {name!r} is not a file name")
            return [_weight_path(directory, name, index_path) for name in sorted(set(weight_map.values()))]
        if os.path.isfile(os.path.join(directory, single)):
            return [_weight_path(directory, single, directory)]
    raise CheckpointError(
        f"{directory} holds no weights: expected {SAFE_SINGLE}, {BIN_SINGLE} or a sharded "
        f"index ({SAFE_INDEX} / {BIN_INDEX})"
    )


def _read_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # UnpicklingError for hostile pickles, RuntimeError/EOFError for truncation
        raise CheckpointError(
            f"{path}: cannot be loaded safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'corrupt or truncated'})"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(state).__name__}")
    return state


def check_weight_file(path: str) -> str | None:
    """What is wrong with a weights file, judged from its size and structure without reading the tensors, or None.

    safetensors: the header's last data offset must end exactly at the end of the file. Zip pickles (torch.save):
    the zip directory at the end of the file must be readable and every entry must lie inside the file. Old-style
    (non-zip) pickles have no such record and are not checked."""
    size = os.path.getsize(path)
    if path.endswith(".safetensors"):
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"truncated: {size} bytes, shorter than a safetensors header"
            header_len = int.from_bytes(prefix, "little")
            if header_len > size - 8:
                return f"truncated: the header alone needs {header_len + 8:,} bytes, the file has {size:,}"
            try:
                header = json.loads(f.read(header_len))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                return f"unreadable safetensors header ({type(exc).__name__}: {exc})"
        expected = 8 + header_len + end
        if size < expected:
            return f"truncated: {size:,} bytes, its header describes {expected:,}"
        if size > expected:
            return f"{size - expected:,} bytes more than its header describes"
        return None
    if not zipfile.is_zipfile(path):
        try:
            with open(path, "rb") as f:
                magic = f.read(2)
        except OSError as exc:
            return f"unreadable ({exc})"
        # torch.save's zip format starts with PK; a file that does and is no valid zip lost its end
        return "truncated or corrupt: its zip directory is missing" if magic == b"PK" else None
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if entry.header_offset + entry.compress_size > size:
                    return f"truncated: entry {entry.filename!r} runs past the end of the file ({size:,} bytes)"
    except (zipfile.BadZipFile, OSError) as exc:
        return f"corrupt zip archive ({exc})"
    return None


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(key, tensor, file) for every tensor of every file, one file open at a time."""
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key), path
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from exc
        else:
            for key, tensor in _read_bin(path).items():
                if not isinstance(tensor, torch.Tensor):
                    raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
                yield key, tensor, path


def load(
    path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    cls=None,
    progress: bool = False,
    quantize: str | None = None,
    architectures: dict | None = None,
):
    """Load an HF-format ModuleFormer directory (or hub id) as the class named in `architectures`.

    dtype=None keeps the stored dtype (bf16 for the released MoLM models); pass torch.float32 to upcast as
    transformers' from_pretrained does by default. `cls` forces a head (a causal-LM checkpoint loaded as a
    classifier gets a freshly initialised `score`, as in the original). quantize="int8" quantizes the experts and
    lm_head after loading (molm.quantize); a checkpoint saved quantized loads as such without it.
    """
    if quantize is not None and quantize not in quant.METHODS:
        raise ValueError(f"quantize must be one of {quant.METHODS} or None, got {quantize!r}")
    directory = resolve(path)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{directory} has no config.json")
    try:
        config = ModuleFormerConfig.from_json_file(config_path)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    files = weight_files(directory)
    if cls is None:  # the class config.json names, from `architectures` (name -> class)
        name = (config.architectures or ["ModuleFormerForCausalLM"])[0]
        if name not in (architectures or {}):
            raise CheckpointError(
                f"{config_path}: unknown architecture {name!r}; molm knows {sorted(architectures or {})}"
            )
        cls = architectures[name]
    if dtype is None and config.torch_dtype in DTYPES:
        dtype = DTYPES[config.torch_dtype]
    _check_size(cls, config, files, config_path)
    if quantize is not None and config.quantization:
        raise CheckpointError(
            f"{directory} is already quantized ({config.quantization.get('method')}): load it as "
            "it is (without quantize= or --quantize)"
        )
    with torch.device("meta"):  # shapes only: nothing is allocated until a tensor is read
        model = cls(config, backend=backend)
        try:
            quant.prepare_for_checkpoint(model, config.quantization)
        except ValueError as exc:
            raise CheckpointError(f"{config_path}: {exc}") from exc
    expected = dict(model.state_dict())
    loaded: dict[str, torch.Tensor] = {}
    unexpected, mis_shaped, seen_in = [], [], {}
    tensors = iter_tensors(files)
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, total=len(expected), desc="loading", unit="tensor")
    for key, tensor, file in tensors:
        if key in seen_in:
            raise CheckpointError(f"tensor {key!r} appears in both {seen_in[key]} and {file}")
        seen_in[key] = file
        if UNUSED_KEYS.match(key):
            continue
        if key not in expected:
            unexpected.append(f"{key} {list(tensor.shape)}")
            continue
        if tuple(tensor.shape) != tuple(expected[key].shape):
            mis_shaped.append(f"{key}: checkpoint {list(tensor.shape)} vs model {list(expected[key].shape)}")
            continue
        if expected[key].dtype == torch.int8 or key.endswith("_scale"):  # int8 weights and their fp32 scales
            want = expected[key].dtype if expected[key].dtype == torch.int8 else torch.float32
            if tensor.dtype != want and not (want == torch.float32 and tensor.is_floating_point()):
                mis_shaped.append(f"{key}: dtype {tensor.dtype}, expected {want} (quantized checkpoint)")
                continue
            loaded[key] = tensor.to(device=device, dtype=want, copy=True)
            continue
        if not tensor.is_floating_point():
            mis_shaped.append(f"{key}: dtype {tensor.dtype} is not floating point")
            continue
        dtype = dtype or tensor.dtype  # no dtype asked for and none in config.json: keep the stored one
        # copy=True: a tensor read from a memory-mapped file must not stay backed by it, or rewriting the file
        # later would change (or, truncated, crash with SIGBUS) the live model
        loaded[key] = tensor.to(device=device, dtype=dtype, copy=True)
        _warn_if_not_finite(loaded[key], key, file)
    missing = [f"{k} {list(v.shape)}" for k, v in expected.items() if k not in loaded]
    swapped_head = _head_swap(expected, missing, unexpected)
    if missing or unexpected or mis_shaped:
        parts = [
            f"{name} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
            if keys
        ]
        raise CheckpointError(f"{directory}: the weights do not match the config: " + "; ".join(parts))
    model.load_state_dict(loaded, strict=False, assign=True)
    for name in swapped_head:  # the new head's weights, initialised as the original would
        module = model.get_submodule(name)
        module.to_empty(device=device)
        module.to(dtype)
        with torch.no_grad():
            module.weight.normal_(0.0, config.initializer_range)
    model.set_backend(model.backend)  # binds the modules swapped in above
    if quantize is not None:
        quant.quantize(model, quantize)
    model.name_or_path = directory
    return model.eval()


def _check_size(cls, config: ModuleFormerConfig, files: list[str], config_path: str) -> None:
    """Refuse a config that asks for more parameters than the weight files could hold (>= 1 byte each), before
    anything is built, read or allocated: a corrupt or hostile config.json must not lead to allocating terabytes
    (here or in a KV cache later) or to minutes spent building 1,000 layers. Small models (< 64M parameters) fall
    through to the per-key listing instead. The count is exact: layers are identical, so 1- and 2-layer meta
    models give the rest."""
    with torch.device("meta"):
        one, two = (
            sum(t.numel() for t in cls(config.replace(n_layer=n), backend="reference").state_dict().values())
            for n in (1, 2)
        )
    n_params = one + (config.n_layer - 1) * (two - one)
    n_bytes = sum(os.path.getsize(f) for f in files)
    if n_params > max(n_bytes, SMALL_MODEL):
        raise CheckpointError(
            f"{config_path}: the config describes {n_params:,} parameters but the weight files "
            f"hold only {n_bytes:,} bytes; config.json does not belong to these weights"
        )


def _warn_if_not_finite(tensor: torch.Tensor, key: str, file: str) -> None:
    """NaN/Inf weights load (a user may want to inspect them) but never silently."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(tensor).sum())
        warnings.warn(
            f"{file}: tensor {key!r} has {n_nan} NaN and {tensor.numel() - int(finite.sum()) - n_nan} "
            f"infinite value(s) (as {tensor.dtype}); its outputs will not be finite",
            RuntimeWarning,
            stacklevel=3,
        )


def _head_swap(expected: dict, missing: list[str], unexpected: list[str]) -> list[str]:
    """A causal-LM checkpoint loaded as a classifier: drop lm_head, initialise score (the original's behaviour)."""
    if "lm_head.weight" not in expected and any(k.startswith("lm_head.weight") for k in unexpected):
        unexpected[:] = [k for k in unexpected if not k.startswith("lm_head.weight")]
        if any(k.startswith("score.weight") for k in missing):
            missing[:] = [k for k in missing if not k.startswith("score.weight")]
            warnings.warn("score.weight is not in the checkpoint: initialised randomly; finetune before use")
            return ["score"]
    return []


def save_pretrained(model, directory, max_shard_size: int = 5 * 2**30, safe_serialization: bool = True) -> None:
    """config.json + model.safetensors (sharded with an index above max_shard_size), original key names."""
    from safetensors.torch import save_file

    if not safe_serialization:
        raise ValueError("molm writes safetensors only (pickle checkpoints can execute code when loaded)")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    _copy_tokenizer(model, directory)
    _write_tokenizer_config(model, directory)
    config = model.config.replace(
        architectures=[type(model).__name__],
        torch_dtype=str(model.dtype).removeprefix("torch."),
        extra={**model.config.extra, "auto_map": AUTO_MAP},
    )
    config.save_pretrained(directory)
    with open(os.path.join(directory, AUTO_MODULE + ".py"), "w", encoding="utf-8") as f:
        f.write(AUTO_MODULE_SOURCE)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SAFE_SINGLE), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(directory, SAFE_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _copy_tokenizer(model, directory: str) -> None:
    """A model loaded from a directory (or extended / pruned from one) keeps that directory in `name_or_path`: its
    tokenizer files travel with the saved weights, so the saved directory works on its own (`molm generate
    --model`). Files `directory` already has are kept."""
    source = getattr(model, "name_or_path", None)
    if not source or not os.path.isdir(source) or os.path.realpath(source) == os.path.realpath(directory):
        return
    for name in TOKENIZER_FILES:  # a tokenizer already saved in `directory` (by the trainer, say) wins
        if os.path.isfile(os.path.join(source, name)) and not os.path.exists(os.path.join(directory, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))


def _write_tokenizer_config(model, directory: str) -> None:
    """tokenizer.json alone does not tell transformers' AutoTokenizer which class to use or which token ends a text:
    write a tokenizer_config.json (unless one came with the tokenizer) with the token molm's evaluation uses."""
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    config_json = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(tokenizer_json) or os.path.isfile(config_json):
        return
    from tokenizers import Tokenizer

    from .tokenizer import eot_id

    tokenizer = Tokenizer.from_file(tokenizer_json)
    eot = tokenizer.id_to_token(eot_id(model, tokenizer))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.max_position_embeddings}
    if eot is not None:
        settings.update(bos_token=eot, eos_token=eot)
    with open(config_json, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
