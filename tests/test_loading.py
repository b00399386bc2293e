"""Checkpoint formats, save/load round trips and clear errors on bad directories and files."""

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import molm
from molm.checkpoint import CheckpointError

DATA = os.path.join(os.path.dirname(__file__), "data")


def copy_fixture(tmp_path, name="molm-tiny-a"):
    dst = tmp_path / name
    shutil.copytree(os.path.join(DATA, name), dst)
    for path in dst.iterdir():
        path.chmod(0o644)
    return dst


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ids():
    return load_file(os.path.join(DATA, "molm-tiny-b", "golden.safetensors"))["input_ids"]


def test_default_dtype_is_the_stored_one():
    model = molm.load(os.path.join(DATA, "molm-tiny-a"), backend="reference")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.name_or_path.endswith("molm-tiny-a")


@pytest.mark.parametrize("shard_size", [2**40, 100_000])
def test_save_pretrained_round_trip(tmp_path, ids, shard_size):
    model = molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend="reference")
    model.save_pretrained(tmp_path / "out", max_shard_size=shard_size)
    files = sorted(os.listdir(tmp_path / "out"))
    if shard_size < 2**40:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 1
    else:
        assert "model.safetensors" in files
    again = molm.load(tmp_path / "out", backend="reference")
    assert again.dtype == torch.float32
    assert torch.equal(logits_of(model, ids), logits_of(again, ids))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "moduleformer" and saved["architectures"] == ["ModuleFormerForCausalLM"]
    assert saved["transformers_version"] == "4.28.1"  # unknown keys are kept


def test_saved_keys_are_the_original_names(tmp_path):
    model = molm.load(os.path.join(DATA, "molm-tiny-b"), backend="reference")
    model.save_pretrained(tmp_path)
    saved = set(load_file(tmp_path / "model.safetensors"))
    original = set(
        json.loads(open(os.path.join(DATA, "molm-tiny-b", "pytorch_model.bin.index.json")).read())["weight_map"]
    )
    unused = {k for k in original if k.endswith(("attn.mask", "attn.cum_weight"))}
    assert saved == original - unused


def test_seqcls_round_trip(tmp_path):
    model = molm.load(os.path.join(DATA, "molm-tiny-b-seqcls"), dtype=torch.float32, backend="reference")
    model.save_pretrained(tmp_path)
    again = molm.load(tmp_path, backend="reference")
    assert isinstance(again, molm.ModuleFormerForSequenceClassification) and again.num_labels == 3


def test_causal_checkpoint_as_classifier_initialises_score():
    with pytest.warns(UserWarning, match="score.weight"):
        model = molm.ModuleFormerForSequenceClassification.from_pretrained(os.path.join(DATA, "molm-tiny-a"))
    assert model.score.weight.shape == (2, 64) and torch.isfinite(model.score.weight).all()


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    model = molm.load(os.path.join(DATA, "molm-tiny-a"), backend="reference")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.h.1.ln_2.bias"]
    state["transformer.h.0.extra.weight"] = torch.zeros(2)
    state["lm_head.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        molm.load(tmp_path)
    message = str(err.value)
    assert "transformer.h.1.ln_2.bias [64]" in message
    assert "transformer.h.0.extra.weight" in message
    assert "lm_head.weight: checkpoint [3, 3] vs model [512, 64]" in message


def test_malicious_pickle_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    directory = copy_fixture(tmp_path)
    with open(directory / "pytorch_model.bin", "wb") as f:
        pickle.dump({"lm_head.weight": Exploit()}, f)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        molm.load(directory)
    assert not (tmp_path / "pwned").exists()
    # the zip format too
    torch.save({"x": Exploit()}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        molm.load(directory)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_weights_give_a_clear_error(tmp_path, fmt):
    directory = copy_fixture(tmp_path)
    if fmt == "safetensors":
        molm.load(directory, backend="reference").save_pretrained(directory)
        (directory / "pytorch_model.bin").unlink()
        path = directory / "model.safetensors"
    else:
        path = directory / "pytorch_model.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=path.name) as info:
        molm.load(directory)
    assert len(str(info.value).splitlines()) == 1
    # the reader's own error stays attached as the cause (shown by tracebacks, e.g. `molm --debug`)
    assert info.value.__cause__ is not None and not isinstance(info.value.__cause__, CheckpointError)


@pytest.mark.parametrize("shard", ["../escape.bin", "/etc/passwd", "sub/../../x.bin"])
def test_index_shards_outside_the_directory_are_refused(tmp_path, shard):
    directory = copy_fixture(tmp_path, "molm-tiny-b")
    index = json.loads((directory / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = shard
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        molm.load(directory)


def test_symlinked_shard_out_of_the_directory_is_refused(tmp_path):
    directory = copy_fixture(tmp_path, "molm-tiny-b")
    target = tmp_path / "elsewhere.bin"
    shutil.copy(directory / "pytorch_model-00006-of-00006.bin", target)
    (directory / "pytorch_model-00006-of-00006.bin").unlink()
    (directory / "pytorch_model-00006-of-00006.bin").symlink_to(target)
    with pytest.raises(CheckpointError, match="outside the model directory"):
        molm.load(directory)


def test_duplicate_keys_across_shards_are_refused(tmp_path):
    directory = copy_fixture(tmp_path, "molm-tiny-b")
    first = torch.load(directory / "pytorch_model-00001-of-00006.bin", weights_only=True)
    last = torch.load(directory / "pytorch_model-00006-of-00006.bin", weights_only=True)
    last.update({k: v for k, v in list(first.items())[:1]})
    torch.save(last, directory / "pytorch_model-00006-of-00006.bin")
    with pytest.raises(CheckpointError, match="appears in both"):
        molm.load(directory)


def test_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        molm.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text((open(os.path.join(DATA, "molm-tiny-a", "config.json")).read()))
    with pytest.raises(CheckpointError, match="holds no weights"):
        molm.load(tmp_path)
    with pytest.raises(CheckpointError, match="is a file"):
        molm.load(tmp_path / "config.json")
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        molm.load(tmp_path)


def test_hub_id_without_network_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local directory"):
        molm.load("ibm/MoLM-350M-4B")


def test_unknown_architecture(tmp_path):
    directory = copy_fixture(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        molm.load(directory)
