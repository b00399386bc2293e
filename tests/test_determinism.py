"""Determinism: the same prompt, seed and settings give bitwise-identical tokens and logits, run after run and process
after process; a row's results do not depend on the other rows of its batch where the math allows it.

Where bitwise identity does not hold (README "Reliability"): the reference backend in fp32 across batch sizes
(ATen/MKL GEMMs block differently for different M), left padding in fp32 (the padded row's attention sums in
another order), fp32 across torch thread counts, and sampled tokens of a row across batch compositions (one
generator serves the whole batch). There the tests check closeness and equal greedy tokens instead.
"""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

import molm

from backends import BACKENDS, REQUIRE, extension_built
from tolerances import assert_close

DATA = os.path.join(os.path.dirname(__file__), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(DATA, "molm-tiny-b")  # 300-token vocab, the general (non-identity K/V) variant
DTYPES = [torch.float32, torch.bfloat16]
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9, seed=1234)


def prompts(n, length, seed=0):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_models = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thread count is part of "the same settings" (see above); one thread also keeps a busy CI machine fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(backend, dtype):
    if (backend, dtype) not in _models:
        _models[backend, dtype] = molm.load(MODEL, dtype=dtype, backend=backend)
    return _models[backend, dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_same_settings_same_tokens_and_logits(backend, dtype):
    model, ids = load(backend, dtype), prompts(3, 7)
    for settings in ({}, SAMPLING):
        first = molm.generate(model, ids, max_new_tokens=12, **settings)
        second = molm.generate(model, ids, max_new_tokens=12, **settings)
        assert torch.equal(first, second), settings
        assert torch.equal(logits(model, first), logits(model, second))


SCRIPT = """
import sys, torch, molm
sys.path.insert(0, "tests")
from test_determinism import MODEL, SAMPLING, digest, prompts
torch.set_num_threads(1)
for backend in sys.argv[1:]:
    model = molm.load(MODEL, dtype=torch.float32, backend=backend)
    out = molm.generate(model, prompts(3, 7), max_new_tokens=12, **SAMPLING)
    with torch.no_grad():
        print(digest(out, model(out).logits))
"""


def test_same_results_in_a_fresh_process():
    """Nothing depends on addresses, uninitialised memory or process state: a new process gives the same bits
    (at the same thread count, see the module docstring). One subprocess serves both backends."""
    backends = ["reference"] + (["extension"] if extension_built() or REQUIRE else [])
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, *backends], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-1000:]
    here = []
    for backend in backends:
        model = load(backend, torch.float32)
        out = molm.generate(model, prompts(3, 7), max_new_tokens=12, **SAMPLING)
        here.append(digest(out, logits(model, out)))
    assert run.stdout.split() == here


# (backend, dtype) pairs whose rows are bitwise independent of the batch; the reference in fp32 is not
BATCH_INVARIANT = [("extension", torch.float32), ("extension", torch.bfloat16), ("reference", torch.bfloat16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_composition(backend, dtype):
    model = load(backend, dtype)
    batch = prompts(16, 9, seed=1)
    alone_tokens = molm.generate(model, batch[:1], max_new_tokens=10)
    alone_logits = logits(model, alone_tokens)
    for size in (2, 5, 16):
        tokens = molm.generate(model, batch[:size], max_new_tokens=10)
        assert torch.equal(tokens[:1], alone_tokens), f"greedy tokens of row 0 changed with batch size {size}"
        row = logits(model, tokens)[:1]
        if (backend, dtype) in BATCH_INVARIANT:
            assert torch.equal(row, alone_logits), f"row 0 logits changed bitwise with batch size {size}"
        else:
            assert_close(row, alone_logits, dtype=dtype, what=f"row 0 in a batch of {size}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padding(backend, dtype):
    """A short row left-padded next to a long one: same greedy tokens, logits equal within tolerance (the order
    of the attention sum changes); the unpadded row is bitwise unchanged with the extension backend."""
    model = load(backend, dtype)
    long_row, short_row = prompts(1, 12, seed=2), prompts(1, 7, seed=3)
    ids = torch.cat([long_row, torch.cat([torch.zeros(1, 5, dtype=torch.long), short_row], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    padded = molm.generate(model, ids, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(padded[1:, 5:], molm.generate(model, short_row, max_new_tokens=10))
    assert torch.equal(padded[:1], molm.generate(model, long_row, max_new_tokens=10))
    full_mask = torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], 1)
    both = logits(model, padded, full_mask)
    assert_close(both[1:, 5:], logits(model, padded[1:, 5:]), dtype=dtype, what="padded row")
    if backend == "extension" or dtype == torch.bfloat16:
        assert torch.equal(both[:1], logits(model, padded[:1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_depends_on_seed_and_batch_only(backend):
    model = load(backend, torch.float32)
    ids = prompts(4, 5, seed=4)
    a = molm.generate(model, ids, max_new_tokens=16, **SAMPLING)
    assert torch.equal(a, molm.generate(model, ids, max_new_tokens=16, **SAMPLING))
    assert not torch.equal(a, molm.generate(model, ids, max_new_tokens=16, **{**SAMPLING, "seed": 99}))
