"""Hostile checkpoints: every one is refused with one CheckpointError naming the file (or warned about, for NaN/Inf
weights), runs no code, allocates nothing config-sized, and leaves no half-loaded model behind.

tests/test_loading.py already covers: os.system pickles (plain and zip), truncated files, '../' / absolute /
symlinked-out shard names, duplicate keys across .bin shards, missing/unexpected/mis-shaped keys. This file adds
the rest; `HOSTILE_COUNT` below is the number of hostile inputs it tries (quoted in README "Reliability").
"""

import json
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

import molm
from molm.checkpoint import CheckpointError

DATA = os.path.join(os.path.dirname(__file__), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_fixture(tmp_path, name="molm-tiny-a"):
    dst = tmp_path / name
    shutil.copytree(os.path.join(DATA, name), dst)
    for path in dst.iterdir():
        path.chmod(0o644)
    return dst


def safetensors_fixture(tmp_path, name="molm-tiny-a", **save_kwargs):
    """The fixture re-saved as safetensors (fp32), without its .bin files."""
    dst = tmp_path / f"{name}-st"
    molm.load(os.path.join(DATA, name), dtype=torch.float32, backend="reference").save_pretrained(dst, **save_kwargs)
    shutil.copy(os.path.join(DATA, name, "tokenizer.json"), dst)
    return dst


# ------------------------------------------------------------------------------------------------ code execution
class OsSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Exec(OsSystem):
    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class Popen(OsSystem):
    def __reduce__(self):
        return subprocess.Popen, (["touch", str(self.marker)],)


def raw_global_pickle(marker) -> bytes:
    """Hand-written protocol-0 pickle: GLOBAL posix.system, no __reduce__ on our side at all."""
    return b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


def payload_bytes(kind, marker) -> bytes:
    if kind == "raw_global":
        return raw_global_pickle(marker)
    cls = {"exec": Exec, "popen": Popen}[kind]
    return pickle.dumps({"lm_head.weight": cls(marker)})


PAYLOADS = ["exec", "popen", "raw_global"]


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_are_live(tmp_path, kind):
    """The payloads really run code when unpickled without weights_only: the refusals below are not vacuous."""
    marker = tmp_path / "ran"
    pickle.loads(payload_bytes(kind, marker))
    for _ in range(100):  # Popen returns before the child has run
        if marker.exists():
            break
        import time

        time.sleep(0.02)
    assert marker.exists()


@pytest.mark.parametrize("where", ["single", "shard"])
@pytest.mark.parametrize("kind", PAYLOADS)
def test_malicious_pickles_run_no_code(tmp_path, kind, where):
    marker = tmp_path / "pwned"
    if where == "single":
        directory = copy_fixture(tmp_path)
        target = directory / "pytorch_model.bin"
    else:  # the 4th of 6 shards: three good shards are read first
        directory = copy_fixture(tmp_path, "molm-tiny-b")
        target = directory / "pytorch_model-00004-of-00006.bin"
    target.write_bytes(payload_bytes(kind, marker))
    with pytest.raises(CheckpointError, match=f"{target.name}: cannot be loaded safely"):
        molm.load(directory)
    assert not marker.exists()


def test_malicious_pickle_through_the_cli_is_one_line(tmp_path):
    directory = copy_fixture(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"lm_head.weight": Exec(marker)}, directory / "pytorch_model.bin")  # zip format, mmap path
    run = subprocess.run(
        [sys.executable, "-m", "molm.cli", "generate", "--model", str(directory), "hi"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 1
    assert "pytorch_model.bin: cannot be loaded safely" in run.stderr and "Traceback" not in run.stderr
    assert not marker.exists()


class LyingTensor:
    """A pickled tensor whose size/stride/offset claim more than its storage holds."""

    def __init__(self, size, stride, offset=0):
        self.size, self.stride, self.offset = size, stride, offset

    def __reduce__(self):
        storage = torch.storage.TypedStorage(
            wrap_storage=torch.zeros(4).untyped_storage(), dtype=torch.float32, _internal=True
        )
        return torch._utils._rebuild_tensor_v2, (storage, self.offset, self.size, self.stride, False, OrderedDict())


BIN_LIES = [((64, 512), (512, 1)), ((4,), (1,), 100), ((2, 2), (10**9, 1)), ((2**40,), (1,))]


@pytest.mark.parametrize("lie", BIN_LIES, ids=["bigger", "offset", "stride", "huge"])
def test_pickled_tensor_lying_about_its_size(tmp_path, lie):
    directory = copy_fixture(tmp_path)
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = LyingTensor(*lie)
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot be loaded safely"):
        molm.load(directory)


# ------------------------------------------------------------------------------------------------ safetensors headers
def rewrite_header(path, change=None, body_change=None, length=None, raw_header=None):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    if change:
        change(header)
    encoded = raw_header(json.dumps(header).encode()) if raw_header else json.dumps(header).encode()
    body = body_change(body) if body_change else body
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + body)


def _set(key, field, value):
    def change(header):
        header[key][field] = value

    return change


def _overlap(header):
    a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])


HEAD = "lm_head.weight"  # [512, 64] fp32: 131072 bytes
HEADER_LIES = {
    "shape_bigger": dict(change=_set(HEAD, "shape", [512, 128])),
    "shape_smaller": dict(change=_set(HEAD, "shape", [256, 64])),
    "offsets_past_end": dict(change=_set(HEAD, "data_offsets", [0, 10**12])),
    "offsets_reversed": dict(change=_set(HEAD, "data_offsets", [131072, 0])),
    "offsets_overlap": dict(change=_overlap),
    "dtype_size_lie": dict(change=_set(HEAD, "dtype", "F16")),
    "dtype_unknown": dict(change=_set(HEAD, "dtype", "Q9")),
    "shape_negative": dict(change=_set(HEAD, "shape", [-512, -64])),
    "shape_overflow": dict(change=_set(HEAD, "shape", [2**62, 2**62])),
    "header_length_huge": dict(length=10**15),
    "header_length_short": dict(length=16),
    "header_not_json": dict(raw_header=lambda h: b"{not json" + h[9:]),
    "header_duplicate_key": dict(raw_header=lambda h: h.replace(b'"transformer.ln_f.bias"', f'"{HEAD}"'.encode())),
    "body_short": dict(body_change=lambda b: b[:-4]),
    "body_long": dict(body_change=lambda b: b + b"\0" * 64),
}


@pytest.mark.parametrize("lie", sorted(HEADER_LIES))
def test_safetensors_header_lies(tmp_path, lie):
    directory = safetensors_fixture(tmp_path)
    rewrite_header(directory / "model.safetensors", **HEADER_LIES[lie])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated safetensors file"):
        molm.load(directory)


def test_safetensors_integer_dtype_of_the_right_size_is_named(tmp_path):
    """I32 has F32's size, so the header is consistent: the loader itself must refuse the tensor, by name."""
    directory = safetensors_fixture(tmp_path)
    rewrite_header(directory / "model.safetensors", change=_set(HEAD, "dtype", "I32"))
    with pytest.raises(CheckpointError, match=f"{HEAD}: dtype torch.int32 is not floating point"):
        molm.load(directory)


def test_duplicate_keys_across_safetensors_shards(tmp_path):
    directory = safetensors_fixture(tmp_path, max_shard_size=100_000)
    shards = sorted(directory.glob("model-*.safetensors"))
    first, last = load_file(shards[0]), load_file(shards[-1])
    key = next(iter(first))
    save_file({**last, key: first[key]}, shards[-1])
    with pytest.raises(CheckpointError, match=f"tensor '{key}' appears in both"):
        molm.load(directory)


# ------------------------------------------------------------------------------------------------ paths and links
def _index_dir(tmp_path, shard_name, make=None):
    directory = copy_fixture(tmp_path, "molm-tiny-b")
    if make:
        make(tmp_path, directory)
    index = json.loads((directory / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = shard_name
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


def _linked_subdir(tmp_path, directory):  # sub -> a directory outside, holding a real shard
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(directory / "pytorch_model-00006-of-00006.bin", outside / "x.bin")
    (directory / "sub").symlink_to(outside, target_is_directory=True)


def _loop(tmp_path, directory):
    (directory / "loop.bin").symlink_to(directory / "loop.bin")


def _to_dev(tmp_path, directory):
    (directory / "zero.bin").symlink_to("/dev/zero")


PATH_CASES = {
    "linked_subdir": ("sub/x.bin", _linked_subdir, "outside the model directory"),
    "symlink_loop": ("loop.bin", _loop, "loop.bin"),
    "dev_zero": ("zero.bin", _to_dev, "outside the model directory"),
    "backslash_escape": ("..\\escape.bin", None, "outside the model directory"),
    "empty_name": ("", None, "outside the model directory"),
    "not_a_string": (7, None, "is not a file name"),
    "directory_itself": (".", None, "outside the model directory"),
}


@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_index_paths(tmp_path, case):
    name, make, message = PATH_CASES[case]
    directory = _index_dir(tmp_path, name, make)
    with pytest.raises(CheckpointError, match=message):
        molm.load(directory)


@pytest.mark.parametrize("index", [None, {"weight_map": ["a.bin"]}, {"no_map": {}}, "[1, 2"])
def test_malformed_index(tmp_path, index):
    directory = copy_fixture(tmp_path, "molm-tiny-b")
    text = index if isinstance(index, str) else json.dumps(index)
    (directory / "pytorch_model.bin.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="pytorch_model.bin.index.json"):
        molm.load(directory)


def test_single_weights_file_linked_out_is_refused(tmp_path):
    directory = copy_fixture(tmp_path)
    (directory / "pytorch_model.bin").rename(tmp_path / "elsewhere.bin")
    (directory / "pytorch_model.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(CheckpointError, match="outside the model directory"):
        molm.load(directory)


def test_hugging_face_cache_links_are_allowed(tmp_path):
    """A hub snapshot: snapshots/<rev>/<file> are links into ../../blobs; that is not an escape."""
    repo = tmp_path / "models--ibm--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for path in sorted(os.listdir(os.path.join(DATA, "molm-tiny-b"))):
        blob = repo / "blobs" / f"blob-{path}"
        shutil.copy(os.path.join(DATA, "molm-tiny-b", path), blob)
        (snapshot / path).symlink_to(os.path.relpath(blob, snapshot))
    model = molm.load(snapshot, dtype=torch.float32, backend="reference")
    reference = molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend="reference")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


# ------------------------------------------------------------------------------------------------ absurd configs
def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


ABSURD = {
    "n_embd_1e9": ({"n_embd": 10**9}, "'n_embd' = 1000000000 exceeds"),
    "experts_1e6": ({"n_mlp_experts": 10**6}, "'n_mlp_experts' = 1000000 exceeds"),
    "vocab_1e10": ({"vocab_size": 10**10}, "'vocab_size' = 10000000000 exceeds"),
    "layers_1e7": ({"n_layer": 10**7}, "'n_layer' = 10000000 exceeds"),
    "n_embd_string": ({"n_embd": "64"}, "'n_embd' must be an integer"),
    "n_embd_float": ({"n_embd": 64.0}, "'n_embd' must be an integer"),
    "n_embd_bool": ({"n_embd": True}, "'n_embd' must be an integer"),
    "n_head_zero": ({"n_head": 0}, "'n_head' must be >= 1"),
    "k_above_e": ({"k_mlp": 9}, "k_mlp"),
    # each field within its sane limit, together ~10^15 parameters: caught by the weights-size check
    "within_limits_together": (
        {"n_embd": 65_536, "ffd_hidden": 262_144, "n_mlp_experts": 65_536, "n_layer": 1_024, "att_hidden": 65_536},
        "parameters but the weight files hold only",
    ),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_config_fails_before_allocating(tmp_path, case):
    change, message = ABSURD[case]
    directory = copy_fixture(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (directory / "config.json").write_text(json.dumps(config))
    before = _max_rss_mib()
    with pytest.raises(CheckpointError, match=message) as err:
        molm.load(directory)
    assert "config.json" in str(err.value)
    assert _max_rss_mib() - before < 64, "the loader allocated memory for a config it then refused"


# ------------------------------------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_non_finite_weights_warn_naming_the_tensor(tmp_path, fmt):
    if fmt == "safetensors":
        directory = safetensors_fixture(tmp_path)
        state = load_file(directory / "model.safetensors")
    else:
        directory = copy_fixture(tmp_path)
        state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    key = "transformer.h.1.mlpf.experts.weight"
    bad = state[key].clone()
    bad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    state[key] = bad
    if fmt == "safetensors":
        save_file(state, directory / "model.safetensors")
    else:
        torch.save(state, directory / "pytorch_model.bin")
    with pytest.warns(RuntimeWarning, match=rf"tensor '{key}' has 1 NaN and 2 infinite") as record:
        model = molm.load(directory, backend="reference")
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1  # only the bad tensor
    assert torch.isnan(model.state_dict()[key]).sum() == 1  # loaded as stored: the user may inspect it


def test_overflow_on_conversion_warns(tmp_path):
    directory = safetensors_fixture(tmp_path)
    state = load_file(directory / "model.safetensors")
    state["transformer.ln_f.weight"][0] = 1e6  # finite in fp32, inf in fp16
    save_file(state, directory / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        molm.load(directory, backend="reference")  # fp32: no warning
    with pytest.warns(RuntimeWarning, match=r"'transformer.ln_f.weight' has 0 NaN and 1 infinite.*float16"):
        molm.load(directory, dtype=torch.float16, backend="reference")


# ------------------------------------------------------------------------------------------------ live models
LIVE_SCRIPT = """
import os, sys, torch, molm
for directory, weights in zip(sys.argv[1::2], sys.argv[2::2]):
    model = molm.load(directory, backend="reference")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    open(os.path.join(directory, weights), "wb").close()  # what torch.save / save_file to the same path do first
    with torch.no_grad():
        after = model(ids).logits
    print(weights, "same" if torch.equal(before, after) else "changed", flush=True)
"""


def test_rewriting_the_files_does_not_touch_a_live_model(tmp_path):
    """Loaded weights own their memory: a memory-mapped tensor left in the model would change when the file is
    rewritten and die with SIGBUS when it is truncated (run in a subprocess so a regression fails, not crashes)."""
    args = [str(copy_fixture(tmp_path)), "pytorch_model.bin", str(safetensors_fixture(tmp_path)), "model.safetensors"]
    run = subprocess.run(
        [sys.executable, "-c", LIVE_SCRIPT, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert run.returncode == 0, f"exit {run.returncode} (-7 = SIGBUS) after {run.stdout!r}: {run.stderr[-500:]}"
    assert run.stdout.split() == ["pytorch_model.bin", "same", "model.safetensors", "same"]


def test_a_failed_load_leaves_the_live_model_alone(tmp_path):
    """Load a model, break its directory in several ways, retry: every retry raises and the first model, its
    logits and its parameters are untouched; no half-built model is returned."""
    directory = copy_fixture(tmp_path, "molm-tiny-b")
    model = molm.load(directory, dtype=torch.float32, backend="reference")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
    last = directory / "pytorch_model-00006-of-00006.bin"
    good = last.read_bytes()
    for breakage in (
        lambda: last.write_bytes(good[: len(good) // 3]),
        lambda: last.write_bytes(raw_global_pickle(tmp_path / "pwned")),
    ):
        breakage()
        result = None
        with pytest.raises(CheckpointError, match=last.name):
            result = molm.ModuleFormerForCausalLM.from_pretrained(directory)
        assert result is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert not (tmp_path / "pwned").exists()
