"""Loaders and metrics for molm's local tasks: the data sits next to this file, so nothing is downloaded."""

import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))


def _jsonl(name: str):
    import datasets

    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_choice(**_):
    return _jsonl("molm_choice.jsonl")


def load_text(**_):
    return _jsonl("molm_text.jsonl")


def load_qa(**_):
    return _jsonl("molm_qa.jsonl")


def perplexity_results(doc, results):
    """As the harness' wikitext task: words and bytes of the original text weight the document's log-likelihood."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    nbytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
