"""Generation: greedy/sampling, batching with left padding, eos, stop strings, streaming, bad settings."""

import os
import warnings

import pytest
import torch

import molm
from molm.generate import sample_next

from backends import BACKENDS

DATA = os.path.join(os.path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def model():
    return molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend="reference")


def test_batched_left_padded_prompts_match_single_runs(model):
    prompts = ["It was the best of times", "Call me", "the winter of despair, it was"]
    batched = molm.generate(model, prompts, max_new_tokens=8)
    singles = [molm.generate(model, p, max_new_tokens=8) for p in prompts]
    assert batched == singles
    assert all(isinstance(t, str) for t in batched)


def test_stream_yields_the_same_text(model):
    prompt = "It was the age of"
    pieces = list(molm.generate(model, prompt, max_new_tokens=12, stream=True))
    assert "".join(pieces) == molm.generate(model, prompt, max_new_tokens=12)


def test_stop_strings_cut_the_text(model):
    full = molm.generate(model, "It was", max_new_tokens=16)
    stop = full[3:5]
    assert stop and stop in full
    cut = molm.generate(model, "It was", max_new_tokens=16, stop=stop)
    assert cut == full[: full.find(stop)]
    assert "".join(molm.generate(model, "It was", max_new_tokens=16, stop=[stop], stream=True)) == cut


def test_sampling_is_seeded(model):
    ids = torch.tensor([[5, 6, 7]])
    a = molm.generate(model, ids, max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    b = molm.generate(model, ids, max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=3)
    assert torch.equal(a, b) and a.shape == (1, 13) and torch.equal(a[:, :3], ids)


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, 1.0, top_k=2, generator=g).item() in (1, 2)
        assert sample_next(logits, 1.0, top_p=0.5, generator=g).item() == 1


def test_eos_stops_rows(tmp_path):
    config = molm.ModuleFormerConfig.from_pretrained(os.path.join(DATA, "molm-tiny-b"))
    base = molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend="reference")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    free = molm.generate(base, ids, max_new_tokens=10)
    eos = int(free[0, 4])  # the second generated token of row 0 becomes eos
    base.config = config.replace(eos_token_id=eos)
    out = molm.generate(base, ids, max_new_tokens=10)
    row0 = out[0, 3:].tolist()
    first = row0.index(eos)
    assert all(t == eos for t in row0[first:])  # finished rows are padded with eos
    assert torch.equal(out[:, :3], ids)


def test_bad_settings(model):
    with pytest.raises(ValueError, match="temperature"):
        molm.generate(model, torch.tensor([[1]]), temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        molm.generate(model, torch.tensor([[1]]), top_p=0.0)
    with pytest.raises(ValueError, match="empty"):
        molm.generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="prompt"):
        molm.generate(model, 42)
    with pytest.raises(ValueError, match="no tokens"):
        molm.generate(model, "")


def test_bad_settings_fail_before_a_stream_starts(model):
    """stream=True validates at the call, not at the first token (a CLI would have printed the prompt by then)."""
    with pytest.raises(ValueError, match="max_new_tokens"):
        molm.generate(model, "It was", max_new_tokens=-1, stream=True)
    with pytest.raises(ValueError, match="top_k"):
        molm.generate(model, torch.tensor([[1, 2]]), top_k=0, stream=True)


def test_a_tokenizer_of_another_model_is_named(model):
    from tokenizers import Tokenizer, models, pre_tokenizers

    big = Tokenizer(models.WordLevel({"[UNK]": 0, "It": 600, "was": 601}, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    vocab = model.config.vocab_size
    assert vocab < 600
    with pytest.raises(ValueError, match=f"the tokenizer does not match the model: it encodes the prompt to token id "
                                         f"601, but the model has only {vocab} tokens"):
        molm.generate(model, "It was", tokenizer=big, stream=True)


def test_a_prompt_longer_than_the_trained_context_warns(model):
    context = model.config.history_length + model.config.block_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        molm.generate(model, torch.ones(1, context, dtype=torch.long), max_new_tokens=1)  # exactly fits: quiet
    with pytest.warns(UserWarning, match=f"the prompt is {context + 1} tokens long, longer than the {context} tokens"):
        molm.generate(model, torch.ones(1, context + 1, dtype=torch.long), max_new_tokens=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export_round_trip(tmp_path, backend):
    """torch.export.export(model, (ids,)) returns molm's ModelOutput; the exported program, also after
    save/load, gives the eager logits on other tokens of the same shape."""
    model = molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend=backend)
    exported = torch.export.export(model, (torch.tensor([[5, 6, 7, 8, 9]]),))
    torch.export.save(exported, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    ids = torch.tensor([[11, 3, 40, 2, 17]])
    with torch.no_grad():
        eager = model(ids)
        for program in (exported, loaded):
            out = program.module()(ids)
            assert isinstance(out, molm.ModelOutput)
            torch.testing.assert_close(out.logits, eager.logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(out.aux_loss, eager.aux_loss, rtol=0, atol=1e-6)
