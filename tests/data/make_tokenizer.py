"""Writes the tiny byte-level BPE tokenizer.json (300 ids) shipped with the test fixtures.

The fixtures' weights are random, so any tokenizer whose ids fit their vocab (300 / 512) serves for the text
paths of generate and the CLI. Run: python tests/data/make_tokenizer.py
"""

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = """It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the
season of Darkness, it was the spring of hope, it was the winter of despair. Call me Ishmael. Some years ago, never
mind how long precisely, having little or no money in my purse, and nothing particular to interest me on shore,
I thought I would sail about a little and see the watery part of the world."""


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([TEXT] * 4, trainer)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("molm-tiny-a", "molm-tiny-b"):
        tokenizer.save(os.path.join(here, name, "tokenizer.json"))


if __name__ == "__main__":
    main()
