"""Model parity with the golden outputs of the original ModuleFormer code, cache and padding behaviour."""

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import molm
from molm.config import ModuleFormerConfig

from backends import BACKENDS

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = ["molm-tiny-a", "molm-tiny-b"]
TOL_FP32 = 1e-4
# bf16 weights + bf16 activations vs the fp32 golden: routing near-ties may flip an expert (docs/model.md §3.7), so
# bf16 is checked on aggregate agreement rather than max error.
TOL_BF16_MEDIAN = 0.05


def golden(name):
    return load_file(os.path.join(DATA, name, "golden.safetensors"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FIXTURES)
def test_causal_lm_matches_golden(name, backend):
    g = golden(name)
    model = molm.load(os.path.join(DATA, name), dtype=torch.float32, backend=backend)
    assert model.backend == backend
    with torch.no_grad():
        plain = model(g["input_ids"])
        masked = model(g["input_ids"], attention_mask=g["attention_mask"], labels=g["labels"])
    assert plain.logits.dtype == torch.float32
    assert (plain.logits - g["logits"]).abs().max() <= TOL_FP32
    assert (masked.logits - g["logits_masked"]).abs().max() <= TOL_FP32
    assert (masked.loss - g["loss"]).abs() <= TOL_FP32
    assert (masked.aux_loss - g["aux_loss"]).abs() <= TOL_FP32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_generation_matches_golden(name, backend):
    g = golden(name)
    model = molm.load(os.path.join(DATA, name), dtype=torch.float32, backend=backend)
    out = molm.generate(model, g["greedy_prompt"], max_new_tokens=16)
    assert torch.equal(out, g["greedy_output"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FIXTURES)
def test_sequence_classification_matches_golden(name, backend):
    g = golden(name + "-seqcls")
    model = molm.load(os.path.join(DATA, name + "-seqcls"), dtype=torch.float32, backend=backend)
    assert isinstance(model, molm.ModuleFormerForSequenceClassification)
    with torch.no_grad():
        logits = model(g["input_ids"]).logits
    assert (logits - g["logits"]).abs().max() <= TOL_FP32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FIXTURES)
def test_bf16_close_to_golden(name, backend):
    g = golden(name)
    model = molm.load(os.path.join(DATA, name), dtype=torch.bfloat16, backend=backend)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(g["input_ids"], attention_mask=g["attention_mask"], labels=g["labels"])
    assert out.logits.dtype == torch.float32
    valid = g["attention_mask"].bool()
    err = (out.logits - g["logits_masked"]).abs()[valid]
    assert err.median() <= TOL_BF16_MEDIAN
    # most next-token argmaxes agree with the fp32 original
    agree = (out.logits.argmax(-1) == g["logits_masked"].argmax(-1))[valid].float().mean()
    assert agree >= 0.8
    assert abs(out.loss.float() - g["loss"]) <= 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FIXTURES)
def test_incremental_decoding_equals_full_forward(name, backend):
    g = golden(name)
    model = molm.load(os.path.join(DATA, name), dtype=torch.float32, backend=backend)
    ids, mask = g["input_ids"], g["attention_mask"]
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :9], attention_mask=mask[:, :9], use_cache=True)
        pieces, cache = [out.logits], out.past_key_values
        for t in range(9, ids.shape[1], 5):  # chunks of 5 then the remainder: T > 1 with a cache too
            out = model(ids[:, t : t + 5], attention_mask=mask[:, : t + 5], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
    assert (torch.cat(pieces, 1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_legacy_tuple_cache_round_trip(backend):
    g = golden("molm-tiny-b")
    model = molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend=backend)
    ids = g["input_ids"][:1]
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :-1], use_cache=True, past_key_values=())
        assert isinstance(first.past_key_values, tuple) and len(first.past_key_values) == 3
        k, v = first.past_key_values[0]
        assert k.shape == (1, ids.shape[1] - 1, model.config.att_hidden) and v.shape == k.shape
        last = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True)
    assert (last.logits[:, -1] - full[:, -1]).abs().max() <= 1e-5


def test_identity_kv_cache_stores_one_tensor():
    model = molm.load(os.path.join(DATA, "molm-tiny-a"), dtype=torch.float32, backend="reference")
    cache = molm.KVCache.for_model(model, 2, 8)
    assert cache.values is None and len(cache.keys) == model.config.n_layer
    legacy = cache.to_legacy()
    assert legacy[0][0] is legacy[0][1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padding_does_not_change_outputs(backend):
    """Stick-breaking with a -inf-like bias on padded keys ignores them: a left-padded row equals the unpadded one."""
    model = molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend=backend)
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(ids).logits
        b = model(padded, attention_mask=mask).logits[:, 3:]
    assert (a - b).abs().max() <= 1e-5


def test_backends_agree_on_a_random_general_model():
    """k from 1 to E, multi-head projected K/V, linear and gmm routers: not just the two fixtures' shapes."""
    pytest.importorskip("molm.ops")
    from backends import extension_built

    if not extension_built():
        pytest.skip("molm._C not built")
    for k_att, k_mlp, n_head, gate in ((1, 1, 2, "mlp"), (4, 8, 1, "linear"), (2, 3, 4, "gmm")):
        config = ModuleFormerConfig(
            vocab_size=97,
            n_embd=32,
            n_layer=2,
            n_head=n_head,
            att_hidden=16 * n_head,
            ffd_hidden=40,
            gating_size=16,
            n_att_experts=4,
            k_att=k_att,
            n_mlp_experts=8,
            k_mlp=k_mlp,
            gate_type=gate,
        )
        model = molm.ModuleFormerForCausalLM(config, backend="reference").init_weights(seed=1).eval()
        ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref = model(ids)
            ext = model.set_backend("extension")(ids)
        assert (ref.logits - ext.logits).abs().max() <= 1e-4
        assert (ref.aux_loss - ext.aux_loss).abs() <= 1e-5


def _router_and_input(backend):
    config = ModuleFormerConfig(vocab_size=50, n_embd=32, n_layer=1, att_hidden=32, ffd_hidden=40, gating_size=24)
    model = molm.ModuleFormerForCausalLM(config, backend=backend).init_weights(seed=3).eval()
    return model.transformer.h[0].mlpf.gate, torch.randn(5, 32, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_with_its_gelu_in_the_projection_equals_the_sequential(backend):
    """The mlp router's first projection applies the GELU itself (one op) only where that is the Sequential's math:
    never past a hook, a wrapped module or an active dropout."""
    router, x = _router_and_input(backend)
    w = router.w_gate
    with torch.no_grad():
        assert router._gelu_fusable()
        sequential = w[3](w[2](w[1](F.linear(x, w[0].weight, w[0].bias))))  # torch's own modules, one by one
        torch.testing.assert_close(router.logits(x), sequential, rtol=1e-5, atol=1e-6)

        handle = w[0].register_forward_hook(lambda module, args, out: out * 0 + 1)  # a hook the router must honour
        assert not router._gelu_fusable()
        torch.testing.assert_close(router.logits(x), w[3](torch.full((5, 24), F.gelu(torch.tensor(1.0)).item())))
        handle.remove()

        original = w[0]
        w[0] = torch.nn.Sequential(original, torch.nn.Tanh())  # a wrapper (as an adapter would be) sees its output
        assert not router._gelu_fusable()
        torch.testing.assert_close(router.logits(x), w[3](F.gelu(torch.tanh(original(x)))), rtol=1e-5, atol=1e-6)
        w[0] = original

        router.train()
        w[2].p = 1.0  # training with dropout: every hidden unit dropped, so the logits are exactly zero
        assert not router._gelu_fusable()
        assert torch.equal(router.logits(x), torch.zeros(5, router.num_experts))


def _forward_and_decode(model, ids, mask):
    """(logits, aux loss) of a full forward, and the logits of a 3-token prefill followed by one-token steps."""
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        out = model(ids[:, :3], attention_mask=mask[:, :3], use_cache=True, return_aux_loss=False)
        steps, cache = [out.logits], out.past_key_values
        for t in range(3, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    return full.logits, full.aux_loss, torch.cat(steps, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("name", FIXTURES)  # K = V (tiny-a) and projected K/V (tiny-b)
def test_direct_block_path_is_bitwise_the_module_path(name, backend, dtype, monkeypatch):
    """Where nothing needs the module calls, Block.forward calls the submodules' forwards and the routers' kernels
    itself: the same ops on the same arguments, so bitwise the same logits, aux loss and cached decode."""
    g = golden(name)
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = molm.load(os.path.join(DATA, name), dtype=torch_dtype, backend=backend)
    if dtype == "int8":
        model = molm.quantize(model, "int8")
    assert all(block.direct_ready() for block in model.transformer.h)
    direct = _forward_and_decode(model, g["input_ids"], g["attention_mask"])
    if not model.config.identity_kv:  # a hooked K projection takes the module path, with the same numbers
        calls = []
        handle = model.transformer.h[-1].attn.k_proj.register_forward_hook(lambda m, args, out: calls.append(m))
        assert not model.transformer.h[-1].direct_ready()
        hooked = _forward_and_decode(model, g["input_ids"], g["attention_mask"])
        handle.remove()
        assert calls and all(torch.equal(a, b) for a, b in zip(direct, hooked))
    monkeypatch.setattr(molm.modules.Block, "direct_ready", lambda self: False)
    modular = _forward_and_decode(model, g["input_ids"], g["attention_mask"])
    for a, b in zip(direct, modular):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_block_path_gives_way_to_hooks_patches_and_training(backend):
    """A hook on any module the direct path would skip, a global module hook, a forward patched onto an instance
    (accelerate's offloading does that) and training mode each take the module path; a parametrization of an
    expert weight applies on both paths."""
    model = molm.load(os.path.join(DATA, "molm-tiny-a"), dtype=torch.float32, backend=backend)
    ids = golden("molm-tiny-a")["input_ids"]
    block = model.transformer.h[0]
    calls = []

    def logits():
        with torch.no_grad():
            return model(ids).logits

    base = logits()
    attn_gate, mlp_gate = block.attn.q_proj.gate, block.mlpf.gate
    skipped = [block.ln_1, block.attn, attn_gate, attn_gate.w_gate[0], block.attn.q_proj.experts]
    skipped += [block.attn.q_proj.output_experts, block.ln_2, mlp_gate, mlp_gate.w_gate[3], block.mlpf.experts]
    skipped += [block.mlpf.output_experts]
    for module in skipped:
        handle = module.register_forward_pre_hook(lambda m, args: calls.append(m))
        assert not block.direct_ready()
        torch.testing.assert_close(logits(), base)  # (a hooked w_gate.0 runs its GELU apart: not bitwise)
        assert calls[-1] is module
        handle.remove()
    assert block.direct_ready()

    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: calls.append(m))
    assert not block.direct_ready()
    logits()
    assert block.ln_2 in calls and block.mlpf.output_experts in calls
    handle.remove()

    block.ln_2.forward = lambda x: calls.append("patched") or torch.nn.LayerNorm.forward(block.ln_2, x)
    assert not block.direct_ready()
    assert torch.equal(logits(), base) and calls[-1] == "patched"
    del block.ln_2.forward
    assert block.direct_ready()

    model.train()
    assert not block.direct_ready()
    model.eval()

    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    torch.nn.utils.parametrize.register_parametrization(block.mlpf.experts, "weight", Doubled())
    assert block.direct_ready()  # the experts' own forward reads the parametrized weight
    doubled = logits()
    assert not torch.equal(doubled, base)
    torch.nn.utils.parametrize.remove_parametrizations(block.mlpf.experts, "weight", leave_parametrized=True)
    assert torch.equal(logits(), doubled)


def test_bad_token_ids_and_shapes_raise_clear_errors():
    model = molm.load(os.path.join(DATA, "molm-tiny-a"), dtype=torch.float32, backend="reference")
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("cuda-magic")


def test_parameter_counts():
    model = molm.load(os.path.join(DATA, "molm-tiny-a"), dtype=torch.float32, backend="reference")
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    expert = 2 * c.n_embd * c.att_hidden * (c.n_att_experts - c.k_att) + 2 * c.n_embd * c.ffd_hidden * (
        c.n_mlp_experts - c.k_mlp
    )
    assert model.num_parameters(active=True) == total - c.n_layer * expert


def test_training_mode_backward_and_aux_weight():
    """Dropout, sampled routing and the aux-loss weight run in training; gradients reach every expert used."""
    config = ModuleFormerConfig(
        vocab_size=50,
        n_embd=16,
        n_layer=1,
        n_head=1,
        att_hidden=16,
        ffd_hidden=24,
        gating_size=8,
        n_att_experts=3,
        k_att=2,
        n_mlp_experts=4,
        k_mlp=2,
        sample_topk=1,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        moe_pdrop=0.1,
        aux_loss_weight=0.5,
    )
    model = molm.ModuleFormerForCausalLM(config, backend="reference").init_weights(seed=0).train()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ce + 0.5 * out.aux_loss)
    out.loss.backward()
    assert model.transformer.h[0].mlpf.experts.weight.grad.abs().sum() > 0
    assert model.transformer.h[0].attn.q_proj.gate.w_gate[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_is_bitwise_repeatable(backend):
    g = golden("molm-tiny-b")
    model = molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend=backend)
    with torch.no_grad():
        a = model(g["input_ids"], attention_mask=g["attention_mask"])
        b = model(g["input_ids"], attention_mask=g["attention_mask"])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.aux_loss, b.aux_loss)


def test_torch_compile_fullgraph_matches_golden():
    """The fake kernels let dynamo trace the whole model in one graph; compiled outputs equal the golden ones."""
    from backends import extension_built

    if not extension_built():
        pytest.skip("molm._C not built")
    g = golden("molm-tiny-b")
    model = molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend="extension")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(g["input_ids"], attention_mask=g["attention_mask"], labels=g["labels"])
    assert (out.logits - g["logits_masked"]).abs().max() <= TOL_FP32
    assert (out.loss - g["loss"]).abs() <= TOL_FP32 and (out.aux_loss - g["aux_loss"]).abs() <= TOL_FP32


def test_a_fresh_model_is_initialised():
    """Built without init_weights, every parameter holds finite values and the model gives finite logits."""
    config = molm.ModuleFormerConfig(
        vocab_size=64,
        n_layer=1,
        n_embd=16,
        att_hidden=16,
        ffd_hidden=32,
        n_head=1,
        n_att_experts=4,
        n_mlp_experts=4,
        k_att=2,
        k_mlp=2,
        gating_size=8,
        gate_type="gmm",
    )
    model = molm.ModuleFormerForCausalLM(config)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FIXTURES)
def test_cache_keeps_gradients(name, backend):
    """With grad on, appended K/V stay in the graph: use_cache=True, and a prefix run through the cache followed by
    the rest, give the gradients of one plain forward (also for the legacy tuple cache)."""
    model = molm.load(os.path.join(DATA, name), dtype=torch.float32, backend=backend)
    ids = golden(name)["input_ids"]
    loss_fn = torch.nn.functional.cross_entropy

    def grads_of(run):
        model.zero_grad(set_to_none=True)
        logits = run()
        loss_fn(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    def in_two_steps(legacy):
        first = model(ids[:, :10], use_cache=True)
        past = first.past_key_values.to_legacy() if legacy else first.past_key_values
        second = model(ids[:, 10:], past_key_values=past, use_cache=True)
        if legacy:
            assert all(k.requires_grad for k, _ in second.past_key_values)
        return torch.cat([first.logits, second.logits], 1)

    plain = grads_of(lambda: model(ids).logits)
    for run in (lambda: model(ids, use_cache=True).logits, lambda: in_two_steps(False), lambda: in_two_steps(True)):
        got = grads_of(run)
        for key in plain:
            assert torch.allclose(got[key], plain[key], rtol=1e-4, atol=1e-6), key
    # and without grad the cache still hands back views of its buffers (no copies per decode step)
    cache = molm.KVCache.for_model(model, 3, 30)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        keys, _ = cache.append(
            0,
            torch.zeros(3, 1, cache.keys[0].shape[2]),
            None if cache.values is None else torch.zeros(3, 1, cache.keys[0].shape[2]),
        )
    assert keys.data_ptr() == cache.keys[0].data_ptr()


def test_hidden_states_of_every_layer():
    model = molm.load(os.path.join(DATA, "molm-tiny-a"), dtype=torch.float32)
    ids = golden("molm-tiny-a")["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        assert model(ids).hidden_states is None
        states = out.hidden_states
        assert len(states) == model.config.n_layer + 1
        assert torch.equal(states[0], model.transformer.wte(ids))
        assert torch.allclose(model.lm_head(states[-1]), out.logits, atol=1e-5)
