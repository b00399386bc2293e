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
    with pytest.raises(
        ValueError,
        match=f"the tokenizer does not match the model: it encodes the prompt to token id "
        f"601, but the model has only {vocab} tokens",
    ):
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


# --- repetition penalty and n-gram ban -------------------------------------------------------------------------------
def _repeats_by_hand(row: list[int], logits: torch.Tensor, penalty: float, n: int) -> torch.Tensor:
    """transformers' definitions on one unpadded row, a token at a time (logits [V] float32)."""
    logits = logits.clone()
    for token in set(row):
        logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
    if n and len(row) >= n:
        suffix = row[len(row) - n + 1 :] if n > 1 else []
        for start in range(len(row) - n + 1):
            if row[start : start + n - 1] == suffix:
                logits[row[start + n - 1]] = float("-inf")
    return logits


@pytest.mark.parametrize("penalty,n", [(1.3, 0), (0.7, 0), (1.0, 1), (1.0, 2), (1.2, 3), (1.5, 4)])
def test_penalties_match_transformers_processors(penalty, n):
    transformers = pytest.importorskip("transformers")
    from molm.generate import penalize_repeats

    g = torch.Generator().manual_seed(0)
    vocab = 12  # a small vocabulary, so that rows repeat tokens and n-grams
    ids = torch.randint(0, vocab, (4, 20), generator=g)
    ids[1, 10:] = ids[1, :10]  # a long repeat
    logits = torch.randn(4, vocab, generator=g) * 3  # positive and negative logits
    processors = transformers.LogitsProcessorList()
    if penalty != 1.0:
        processors.append(transformers.RepetitionPenaltyLogitsProcessor(penalty))
    if n:
        processors.append(transformers.NoRepeatNGramLogitsProcessor(n))
    expected = processors(ids, logits.clone())
    ours = penalize_repeats(logits, ids, torch.ones_like(ids, dtype=torch.bool), penalty, n)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, logits)  # the settings did something here
    # Left padding counts for nothing: a padded row gives what transformers gives on the row alone.
    pad = ids[0, -1].item()  # a token the row itself ends with, so counting it would show
    padded = torch.cat([torch.full((4, 5), pad), ids], dim=1)
    padded[0, :5] = ids[0, :5]  # row 0 is longer: no padding; the other rows have 5 padding tokens
    valid = torch.ones_like(padded, dtype=torch.bool)
    valid[1:, :5] = False
    ours = penalize_repeats(logits, padded, valid, penalty, n)
    assert torch.equal(ours[0], processors(padded[:1], logits[:1].clone())[0])
    for row in range(1, 4):
        assert torch.equal(ours[row], processors(ids[row : row + 1], logits[row : row + 1].clone())[0])


def test_penalties_by_hand():
    """The same definitions without transformers: random rows against a plain-Python loop."""
    from molm.generate import penalize_repeats

    g = torch.Generator().manual_seed(1)
    for penalty, n in [(1.3, 0), (0.8, 2), (1.1, 3), (1.0, 1)]:
        ids = torch.randint(0, 9, (3, 16), generator=g)
        logits = torch.randn(3, 9, generator=g)
        ours = penalize_repeats(logits, ids, torch.ones_like(ids, dtype=torch.bool), penalty, n)
        for row in range(3):
            assert torch.equal(ours[row], _repeats_by_hand(ids[row].tolist(), logits[row], penalty, n))


def _greedy_reference(model, rows: list[list[int]], steps: int, penalty: float, n: int, eos=None) -> list[list[int]]:
    """Each row alone, unpadded, the whole sequence through the model at every step (no cache)."""
    out = []
    for row in rows:
        tokens = list(row)
        for _ in range(steps):
            with torch.no_grad():
                logits = model(torch.tensor([tokens])).logits[0, -1]
            token = int(_repeats_by_hand(tokens, logits, penalty, n).argmax())
            tokens.append(token)
            if token == eos:
                break
        out.append(tokens[len(row) :])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_with_penalties_matches_a_reference_loop(backend):
    model = molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend=backend)
    rows = [[5, 6, 7, 5, 6, 9, 40, 7], [11, 3], [8, 9, 10, 8, 9]]
    T = max(map(len, rows))
    plain = _greedy_reference(model, rows, 1, 1.0, 0)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r] = plain[r][0]  # padding holds the row's own next greedy token: counting it would change the text
        ids[r, T - len(row) :] = torch.tensor(row)
        mask[r, T - len(row) :] = 1
    for penalty, n in [(1.5, 0), (1.0, 2), (1.3, 3)]:
        expected = _greedy_reference(model, rows, 20, penalty, n)
        assert expected != _greedy_reference(model, rows, 20, 1.0, 0)  # the settings change the text here
        out = molm.generate(
            model, ids, attention_mask=mask, max_new_tokens=20, repetition_penalty=penalty, no_repeat_ngram_size=n
        )
        assert out[:, T:].tolist() == expected


def test_penalties_survive_dropping_finished_rows():
    """Rows that end at eos leave the batch; the others keep their own history and seen tokens."""
    model = molm.load(os.path.join(DATA, "molm-tiny-b"), dtype=torch.float32, backend="reference")
    rows = [[5, 6, 7, 5], [8, 9, 10, 8]]
    settings = dict(repetition_penalty=1.4, no_repeat_ngram_size=2)
    free = _greedy_reference(model, rows, 12, 1.4, 2)
    eos = free[0][1]  # row 0 ends at its second token ...
    expected = _greedy_reference(model, rows, 12, 1.4, 2, eos=eos)
    assert len(expected[0]) == 2 and len(expected[1]) > 4  # ... and row 1 runs on alone, in a batch of one
    for compact in (True, False):
        steps = torch.stack(
            list(
                molm.generate_ids(
                    model,
                    torch.tensor(rows),
                    max_new_tokens=12,
                    eos_token_id=eos,
                    pad_token_id=0,
                    compact_finished=compact,
                    **settings,
                )
            ),
            1,
        )
        for r, tokens in enumerate(expected):
            assert steps[r, : len(tokens)].tolist() == tokens


@pytest.mark.parametrize(
    "setting,message",
    [
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(repetition_penalty=-1.1), "repetition_penalty must be > 0"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be"),
        (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size must be"),
    ],
)
def test_bad_penalty_settings(model, setting, message):
    with pytest.raises(ValueError, match=message):
        molm.generate(model, "It was", stream=True, **setting)


@pytest.mark.parametrize("rows,vocab", [(1, 50295), (2, 50295), (1, 100), (3, 70000), (64, 50295)])
def test_greedy_ids_is_argmax_over_sliced_rows(rows, vocab):
    """The greedy pick reduces column slices serially: the same ids as torch.argmax, ties (first maximum) and NaN
    (counts as the maximum) included."""
    from molm.generate import greedy_ids

    g = torch.Generator().manual_seed(rows * vocab)
    for trial in range(12):
        x = torch.randn(rows, vocab, generator=g)
        if trial % 3 == 0:
            x[:, ::7] = x.max()  # the maximum repeated in every slice
        if trial % 4 == 1:
            x[0, (2 * vocab) // 3] = float("nan")
            x[0, vocab - 1] = float("nan")
        if trial % 4 == 2:
            x = torch.round(x * 2)  # many equal values
        assert torch.equal(greedy_ids(x), x.argmax(-1)), trial


@pytest.mark.parametrize("shape", [(1, 1, 50295), (2, 1, 50295), (1, 3, 40000), (1, 1, 100), (40, 1, 50295)])
def test_float_logits_widen_exactly(shape):
    from molm.model import float_logits

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        out = float_logits(x)
        assert out.dtype == torch.float32 and out.shape == x.shape and torch.equal(out, x.float())
