"""ModuleFormerConfig: HF json round trip, presets, validation errors that name the field."""

import json
import os

import pytest

from molm.config import PRESETS, ModuleFormerConfig

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize("name", ["molm-tiny-a", "molm-tiny-b", "molm-tiny-b-seqcls"])
def test_json_round_trip_keeps_every_key(tmp_path, name):
    original = json.loads(open(os.path.join(DATA, name, "config.json")).read())
    config = ModuleFormerConfig.from_dict(original)
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for key, value in original.items():
        assert written[key] == value, key
    assert ModuleFormerConfig.from_dict(written) == config


def test_aliases_and_derived_fields():
    config = ModuleFormerConfig.from_pretrained(os.path.join(DATA, "molm-tiny-b"))
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 4, 3)
    assert config.max_position_embeddings == config.history_length + config.block_size
    assert config.head_size == 12 and not config.identity_kv
    assert ModuleFormerConfig.from_pretrained(os.path.join(DATA, "molm-tiny-a")).identity_kv
    assert ModuleFormerConfig.from_dict({**PRESETS["MoLM-350M-4B"]().to_dict(), "hidden_size": 512}).n_embd == 512


def test_presets():
    for name, (layers, k) in {"MoLM-350M-4B": (24, 2), "MoLM-700M-4B": (24, 4), "MoLM-700M-8B": (48, 2)}.items():
        c = PRESETS[name]()
        assert (c.n_layer, c.k_att, c.k_mlp, c.n_att_experts, c.n_mlp_experts) == (layers, k, k, 16, 32)
        assert c.identity_kv and c.n_ctx == 512 * layers


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "unknown model_type 'gpt2'"),
        ({"k_att": 5}, "k_att"),
        ({"k_mlp": 0}, "k_mlp"),
        ({"n_head": 5}, "divisible by n_head"),
        ({"n_embd": 10**9}, "n_embd"),
        ({"n_mlp_experts": 10**6}, "n_mlp_experts"),
        ({"n_layer": "24"}, "n_layer"),
        ({"gate_type": "noisy"}, "gate_type"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"n_embd": None}, "n_embd"),
    ],
)
def test_bad_configs_name_the_field(change, message):
    data = json.loads(open(os.path.join(DATA, "molm-tiny-a", "config.json")).read())
    data.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ModuleFormerConfig.from_dict(data)


def test_missing_shape_fields_are_refused():
    data = json.loads(open(os.path.join(DATA, "molm-tiny-a", "config.json")).read())
    del data["ffd_hidden"], data["n_embd"]
    with pytest.raises(ValueError, match="ffd_hidden"):
        ModuleFormerConfig.from_dict(data)
