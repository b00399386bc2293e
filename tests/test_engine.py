"""The fixed-shape decode step (what CUDA graphs replay) against the plain cached forward, step by step."""

import os

import pytest
import torch

import molm
from molm.cache import KVCache
from molm.engine import DecodePlan, StaticDecoder

from backends import BACKENDS

DATA = os.path.join(os.path.dirname(__file__), "data")


@torch.no_grad()
def _decode_both_ways(model, input_ids, attention_mask, steps, min_window):
    B, T = input_ids.shape
    mask = torch.zeros(B, T + steps, dtype=torch.long)
    mask[:, :T] = attention_mask
    plain_cache, static_cache = KVCache.for_model(model, B, T + steps), KVCache.for_model(model, B, T + steps)
    for cache in (plain_cache, static_cache):
        out = model(input_ids, attention_mask=mask[:, :T], past_key_values=cache, use_cache=True, return_aux_loss=False)
    tokens = out.logits[:, -1].argmax(-1)
    decoder = StaticDecoder(model, static_cache, mask, cuda_graphs=False, min_window=min_window)
    windows, max_diff = set(), 0.0
    for step in range(steps - 1):
        position = T + step
        mask[:, position] = 1
        plain = model(
            tokens[:, None],
            attention_mask=mask[:, : position + 1],
            past_key_values=plain_cache,
            use_cache=True,
            return_aux_loss=False,
        ).logits[:, -1]
        static = decoder.step(tokens, position)
        windows.add(decoder.window(position))
        max_diff = max(max_diff, (plain - static).abs().max().item())
        assert torch.equal(plain.argmax(-1), static.argmax(-1)), f"greedy token differs at step {step}"
        tokens = plain.argmax(-1)
    assert torch.equal(plain_cache.keys[0][:, : T + steps - 1], static_cache.keys[0][:, : T + steps - 1])
    return windows, max_diff


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["molm-tiny-a", "molm-tiny-b"])
def test_static_window_decode_matches_plain_decode(backend, name):
    model = molm.load(os.path.join(DATA, name), dtype=torch.float32, backend=backend)
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(3, 7, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    attention_mask[2, :6] = 0
    windows, max_diff = _decode_both_ways(model, ids, attention_mask, steps=30, min_window=4)
    assert windows == {8, 16, 32, 37}  # crosses window sizes, the last one clipped to the capacity 7 + 30
    assert max_diff < 1e-4


def test_static_decoder_refuses_graphs_off_cuda():
    model = molm.load(os.path.join(DATA, "molm-tiny-a"), dtype=torch.float32)
    cache = KVCache.for_model(model, 1, 8)
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, cache, torch.ones(1, 8, dtype=torch.long), cuda_graphs=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_generation_matches_eager():
    model = molm.load(os.path.join(DATA, "molm-tiny-a"), dtype=torch.float32, device="cuda", backend="extension")
    ids = torch.randint(0, model.config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(1))
    eager = molm.generate(model, ids, max_new_tokens=80)
    graphs = torch.cat(
        [ids.cuda(), torch.stack(list(molm.generate_ids(model, ids, max_new_tokens=80, cuda_graphs=True)), 1)], 1
    )
    no_graphs = torch.cat(
        [ids.cuda(), torch.stack(list(molm.generate_ids(model, ids, max_new_tokens=80, cuda_graphs=False)), 1)], 1
    )
    assert torch.equal(graphs, no_graphs)
    assert torch.equal(eager, graphs)
    reference = molm.generate(model.set_backend("reference"), ids, max_new_tokens=80)
    assert torch.equal(reference, graphs)  # fp32 greedy: the original algorithm's tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_finished_rows_are_dropped_without_changing_tokens(backend, monkeypatch):
    model = molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend=backend)
    gen = torch.Generator().manual_seed(3)
    p1, p2 = torch.randint(0, 300, (1, 6), generator=gen), torch.randint(0, 300, (1, 6), generator=gen)
    ids = torch.cat([p1, p1, p2, p2])  # rows 0 and 1 finish together, so half the batch stops at once
    free = torch.stack(list(molm.generate_ids(model, ids, max_new_tokens=12)), 1)  # no eos: [4, 12]
    eos = int(free[0, 1])
    reorders = []
    monkeypatch.setattr(
        KVCache,
        "reorder",
        lambda self, index, _orig=KVCache.reorder: (reorders.append(index.tolist()), _orig(self, index))[1],
    )
    pad = -1
    steps = torch.stack(list(molm.generate_ids(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)), 1)
    expected = free.clone()
    for row in range(4):
        hits = (free[row] == eos).nonzero()
        if len(hits):
            expected[row, int(hits[0]) + 1 :] = pad
    n = steps.shape[1]
    assert torch.equal(steps, expected[:, :n])
    assert n == 12 or bool((expected[:, n:] == pad).all())  # stopped early only once every row ended
    assert reorders and reorders[0] == [2, 3] or (free[2:] == eos).any()  # the two running rows were kept


# ---------------------------------------------------------------------------------------------- DecodePlan
def _planned_model(name, backend, dtype, gate_type=None, quantize=None):
    model = molm.load(os.path.join(DATA, name), dtype=dtype, backend=backend, quantize=quantize)
    if gate_type is not None:  # same widths, another router: a fresh model initialised from a seed
        config = model.config.replace(gate_type=gate_type)
        model = molm.ModuleFormerForCausalLM(config, backend=backend).init_weights(seed=0).to(dtype).eval()
    return model


@torch.inference_mode()
def _plan_against_model(model, steps=12, runner=True):
    """Left-padded batch of 3: prefill through the model, then each step through the plan (its C++ trunk, or its
    Python one with runner=False) and through the model on two caches; logits and caches must be bitwise equal."""
    B, T = 3, 6
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(B, T + steps, dtype=torch.long)
    mask[:, :T] = 1
    mask[1, :2] = 0
    mask[2, :5] = 0
    caches = [KVCache.for_model(model, B, T + 2), KVCache.for_model(model, B, T + 2)]  # both grow on the way
    for cache in caches:
        out = model(ids, attention_mask=mask[:, :T], past_key_values=cache, use_cache=True, return_aux_loss=False)
    plan = DecodePlan.capture(model)
    assert plan is not None
    assert (plan.runner is not None) == (model.backend == "extension")  # the extension's ops: the C++ trunk
    if not runner:
        plan.runner = None
    tokens = out.logits[:, -1].argmax(-1, keepdim=True)
    for step in range(steps):
        mask[:, T + step] = 1
        expected = model(
            tokens,
            attention_mask=mask[:, : T + step + 1],
            past_key_values=caches[0],
            use_cache=True,
            return_aux_loss=False,
            logits_to_keep=1,
        ).logits[:, -1]
        got = plan.step(tokens, caches[1], mask[:, : T + step + 1])
        assert got.dtype == torch.float32 and torch.equal(got, expected), f"step {step}"
        assert caches[1].length == caches[0].length == T + step + 1
        tokens = expected.argmax(-1, keepdim=True)
    for a, b in zip(caches[0].keys, caches[1].keys):
        assert torch.equal(a[:, : caches[0].length], b[:, : caches[1].length])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,dtype,gate_type",
    [
        ("molm-tiny-a", torch.float32, None),  # K = V = ln_1 output
        ("molm-tiny-b", torch.float32, None),  # K/V projections, 4 heads
        ("molm-tiny-a", torch.bfloat16, None),
        ("molm-tiny-b", torch.float32, "linear"),
    ],
)
def test_decode_plan_steps_are_bitwise_the_model_steps(backend, name, dtype, gate_type):
    model = _planned_model(name, backend, dtype, gate_type)
    _plan_against_model(model)
    if backend == "extension":
        _plan_against_model(model, runner=False)


@pytest.mark.extension
@pytest.mark.parametrize("name", ["molm-tiny-a", "molm-tiny-b"])
def test_decode_plan_of_an_int8_model_is_bitwise_the_model(name):
    model = _planned_model(name, "extension", torch.bfloat16, quantize="int8")
    _plan_against_model(model)
    _plan_against_model(model, runner=False)


def test_decode_plan_declines_what_the_direct_path_declines():
    """Any hook, wrapper, parametrization, other router kind or training mode: no plan (generation then calls the
    model, which honours them)."""
    from torch.nn.utils import parametrize

    def fresh():
        return _planned_model("molm-tiny-a", "reference", torch.float32)

    assert DecodePlan.capture(fresh()) is not None
    model = fresh()
    model.transformer.h[1].ln_2.register_forward_hook(lambda *a: None)
    assert DecodePlan.capture(model) is None
    model = fresh()
    model.transformer.h[0].register_forward_pre_hook(lambda *a: None)
    assert DecodePlan.capture(model) is None
    model = fresh()
    model.register_forward_hook(lambda *a: None)
    assert DecodePlan.capture(model) is None
    model = fresh()
    model.lm_head.forward = lambda x: x  # an instance-patched forward (as accelerate's offload sets)
    assert DecodePlan.capture(model) is None
    model = fresh()
    model.lm_head = torch.nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False)
    assert DecodePlan.capture(model) is None
    model = fresh()

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(model.transformer.h[0].mlpf.experts, "weight", Double())
    assert DecodePlan.capture(model) is None
    model = fresh()
    model.transformer.h[0].attn.q_proj.gate.w_gate[1] = torch.nn.Identity()  # not the GELU the kernel fuses
    assert DecodePlan.capture(model) is None
    model = fresh().train()
    assert DecodePlan.capture(model) is None
    gmm = _planned_model("molm-tiny-a", "reference", torch.float32, gate_type="gmm")
    assert DecodePlan.capture(gmm) is None
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert DecodePlan.capture(fresh()) is None
    finally:
        handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_gives_the_same_tokens_with_and_without_a_plan(backend, monkeypatch):
    model = _planned_model("molm-tiny-b", backend, torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    settings = dict(attention_mask=mask, max_new_tokens=10, temperature=0.8, top_k=20, seed=7)
    captured = []
    real_capture = DecodePlan.capture
    monkeypatch.setattr(
        DecodePlan, "capture", classmethod(lambda cls, m: captured.append(real_capture(m)) or captured[-1])
    )
    planned = torch.stack(list(molm.generate_ids(model, ids, **settings)))
    assert captured and captured[-1] is not None
    monkeypatch.setattr(DecodePlan, "capture", classmethod(lambda cls, m: None))
    plain = torch.stack(list(molm.generate_ids(model, ids, **settings)))
    assert torch.equal(planned, plain)
