"""`molm serve`: the OpenAI-compatible completions server, driven by the official `openai` client.

The reference is `molm.generate` run alone on the same prompt: greedy (and seeded sampled) completions must match
it exactly, also while other requests join and leave the decode batch. Scheduling is made deterministic by a gate
that holds the scheduler before each decode step (`Gate`), never by sleeping.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import molm

REQUIRE = os.environ.get("MOLM_REQUIRE_SERVE") == "1"
try:
    import httpx
    import openai
    import uvicorn
    from prometheus_client.parser import text_string_to_metric_families

    from molm import serve
except ImportError as exc:  # the serve extra (and the openai client) are optional
    if REQUIRE:
        raise
    pytest.skip(f"molm[serve] or openai missing: {exc}", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "molm", "default_model")
NAME = "molm-default"
PROMPTS = [
    "To be, or not to be",
    "Now is the winter of our discontent",
    "O Romeo",
    "Friends, Romans, countrymen,",
    "All the world's a stage, and all the men and women merely players",
    "The king",
]


def wait_until(predicate, what: str, timeout: float = 60.0):
    """Synchronisation with another thread or process (a generous bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class LiveServer:
    """uvicorn serving an app in a thread on a free loopback port."""

    def __init__(self, app):
        self.app, self.engine = app, app.state.engine
        sock = serve.bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, "the server to start")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()

    def post(self, body, **kwargs):
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + "/v1/completions", content=data, timeout=120, **kwargs)

    def complete(self, prompt, **settings):
        return self.client.completions.create(model=NAME, prompt=prompt, **settings)


class Gate:
    """Holds the scheduler before each decode step; `step(k)` lets k steps through, leaving the block opens it."""

    def __init__(self, engine):
        self.engine, self.permits, self.batches, self.blocked = engine, threading.Semaphore(0), [], False

    def __enter__(self):
        original = type(self.engine)._decode

        def gated():
            self.blocked = True
            self.permits.acquire()
            self.blocked = False
            self.batches.append(len(self.engine.running))
            original(self.engine)

        self.engine._decode = gated
        return self

    def step(self, k: int = 1):
        for _ in range(k):
            self.permits.release()

    def wait_blocked(self, steps_done: int):
        wait_until(lambda: self.blocked and len(self.batches) == steps_done, f"decode step {steps_done + 1}")

    def __exit__(self, *exc):
        del self.engine._decode
        self.step(10_000)


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference runs at the scheduler's thread count (same process)
    yield molm.load(DEFAULT_MODEL)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(model):
    return molm.load_tokenizer(model.name_or_path)


@pytest.fixture(scope="module")
def live(model, tokenizer):
    server = LiveServer(serve.create_app(model, tokenizer, NAME, max_batch=32, max_queue=64))
    yield server
    server.close()


def reference(model, tokenizer, prompt, max_tokens, **settings):
    return molm.generate(model, prompt, max_new_tokens=max_tokens, tokenizer=tokenizer, **settings)


def metric(live, name, **labels):
    text = httpx.get(live.url + "/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def wide_steps(live):
    """Decode steps of more than 16 rows so far."""
    return metric(live, "molm_batch_size_count") - metric(live, "molm_batch_size_bucket", le="16.0")


def test_models_health_and_metrics(live):
    assert [m.id for m in live.client.models.list()] == [NAME]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    before = metric(live, "molm_generated_tokens_total"), metric(live, "molm_requests_total")
    out = live.complete(PROMPTS[0], max_tokens=7, temperature=0)
    assert metric(live, "molm_generated_tokens_total") - before[0] == out.usage.completion_tokens
    assert metric(live, "molm_requests_total") - before[1] == 1
    text = httpx.get(live.url + "/metrics").text
    for name in ("molm_queue_depth", "molm_batch_size_bucket", "molm_time_to_first_token_seconds_count"):
        assert name in text


def test_greedy_matches_generate(live, model, tokenizer):
    for prompt, max_tokens in zip(PROMPTS, (1, 5, 17, 40, 24, 64)):
        out = live.complete(prompt, max_tokens=max_tokens, temperature=0)
        expected = reference(model, tokenizer, prompt, max_tokens)
        assert out.choices[0].text == expected
        assert out.usage.prompt_tokens == len(tokenizer.encode(prompt).ids)
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        new = molm.generate(model, ids, max_new_tokens=max_tokens)[0, ids.shape[1] :].tolist()
        eos = model.config.eos_token_id
        assert out.usage.completion_tokens == (new.index(eos) if eos in new else len(new))
        assert out.choices[0].finish_reason == ("length" if out.usage.completion_tokens == max_tokens else "stop")


def test_token_id_prompts_and_echo(live, model, tokenizer):
    ids = tokenizer.encode(PROMPTS[1]).ids
    out = live.complete([ids, tokenizer.encode(PROMPTS[2]).ids], max_tokens=6, temperature=0, echo=True)
    expected = molm.generate(model, torch.tensor([ids]), max_new_tokens=6)[0, len(ids) :].tolist()
    assert out.choices[0].text == tokenizer.decode(ids) + tokenizer.decode(expected)
    assert out.choices[1].text.startswith(tokenizer.decode(tokenizer.encode(PROMPTS[2]).ids))


def test_seeded_sampling_repeats_and_matches_generate(live, model, tokenizer):
    settings = dict(temperature=0.9, top_p=0.9, top_k=40)
    first = live.complete(PROMPTS[0], max_tokens=24, seed=7, extra_body={"top_k": 40}, temperature=0.9, top_p=0.9)
    again = live.complete(PROMPTS[0], max_tokens=24, seed=7, extra_body={"top_k": 40}, temperature=0.9, top_p=0.9)
    other = live.complete(PROMPTS[0], max_tokens=24, seed=8, extra_body={"top_k": 40}, temperature=0.9, top_p=0.9)
    assert (
        first.choices[0].text
        == again.choices[0].text
        == reference(model, tokenizer, PROMPTS[0], 24, seed=7, **settings)
    )
    assert other.choices[0].text == reference(model, tokenizer, PROMPTS[0], 24, seed=8, **settings)
    assert other.choices[0].text != first.choices[0].text


def test_n_choices_use_consecutive_seeds(live, model, tokenizer):
    out = live.complete(PROMPTS[3], max_tokens=10, n=3, seed=100, temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice in out.choices:
        assert choice.text == reference(model, tokenizer, PROMPTS[3], 10, seed=100 + choice.index, temperature=1.0)
    greedy = live.complete([PROMPTS[0], PROMPTS[2]], max_tokens=5, n=2, temperature=0)
    assert [c.text for c in greedy.choices] == [reference(model, tokenizer, p, 5) for p in PROMPTS[:3:2] for _ in "ab"]


def test_stream_matches_the_whole_response(live):
    whole = live.complete(PROMPTS[4], max_tokens=20, temperature=0)
    chunks = list(
        live.complete(PROMPTS[4], max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = live.post({"prompt": PROMPTS[4], "max_tokens": 3, "temperature": 0, "stream": True}).text
    assert raw.endswith("data: [DONE]\n\n") and raw.startswith("data: {")


def test_stop_strings(live, model, tokenizer):
    full = reference(model, tokenizer, PROMPTS[0], 30)
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a piece from the middle of the greedy text
    expected = reference(model, tokenizer, PROMPTS[0], 30, stop=[stop])
    assert expected == full[: full.index(stop)]
    out = live.complete(PROMPTS[0], max_tokens=30, temperature=0, stop=[stop, "never appears"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "stop")
    streamed = live.complete(PROMPTS[0], max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_logprobs(live, model, tokenizer):
    out = live.complete(PROMPTS[1], max_tokens=8, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    for chosen, token, top in zip(lp.token_logprobs, lp.tokens, lp.top_logprobs):
        assert len(top) == 2 and max(top.values()) == chosen == top[token]  # greedy takes the most likely
    ids = tokenizer.encode(PROMPTS[1]).ids  # echo + max_tokens 0 scores the prompt, as the full forward does
    scored = live.complete(PROMPTS[1], max_tokens=0, echo=True, logprobs=0).choices[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    expected = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert scored.text == PROMPTS[1] and scored.logprobs.token_logprobs[0] is None
    assert torch.allclose(torch.tensor(scored.logprobs.token_logprobs[1:]), expected, atol=1e-5)


def test_requests_join_and_leave_a_running_batch(live, model, tokenizer):
    """A decodes alone; B, C, D arrive mid-decode, join the batch after their own prefill and leave when done.
    Every row (greedy and seeded sampled) equals molm.generate run alone."""
    engine = live.engine
    joiners = [
        (PROMPTS[1], dict(max_tokens=5, temperature=0)),
        (PROMPTS[4], dict(max_tokens=12, temperature=0)),
        (PROMPTS[2], dict(max_tokens=9, temperature=0.8, seed=3)),
    ]
    with Gate(engine) as gate, ThreadPoolExecutor(3) as pool:
        stream = iter(live.complete(PROMPTS[5], max_tokens=40, temperature=0, stream=True))
        pieces = [next(stream).choices[0].text]  # the prefill's token; the gate holds the first decode step
        gate.step(3)
        gate.wait_blocked(3)
        futures = [pool.submit(live.complete, p, **s) for p, s in joiners]
        wait_until(lambda: len(engine.waiting) == 3, "the joiners to queue")
        gate.step(10_000)
        pieces += [c.choices[0].text for c in stream]
        results = [f.result().choices[0].text for f in futures]
    assert gate.batches[:5] == [1, 1, 1, 1, 4] and gate.batches[-1] == 1  # joined in the step after arriving
    assert "".join(pieces) == reference(model, tokenizer, PROMPTS[5], 40)
    for (prompt, s), text in zip(joiners, results):
        assert text == reference(model, tokenizer, prompt, s.pop("max_tokens"), **s)


def prompt_scores(model, ids):
    """The log-probability of each prompt token after the ones before it: one full forward, no cache."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_waiting_requests_are_prefilled_in_one_batch(live, model, tokenizer):
    """Requests of different prompt lengths that wait at the same step are prefilled by one forward over their
    left-padded prompts, then decode together; each returns what molm.generate (or a full forward) gives alone."""
    engine = live.engine
    jobs = [  # 6 rows x 10 columns: within the default budget of 64 prompt tokens a step
        (PROMPTS[2], dict(max_tokens=9, temperature=0)),
        ("Friends, Romans,", dict(max_tokens=14, temperature=0)),
        ("The quality of mercy", dict(max_tokens=6, temperature=0)),
        (PROMPTS[0], dict(max_tokens=11, temperature=0.8, seed=5)),
        ("O", dict(max_tokens=1, temperature=0)),  # finishes at its first token
        (PROMPTS[1], dict(max_tokens=0, echo=True, logprobs=1)),  # scores the prompt only
    ]
    assert len({len(tokenizer.encode(p).ids) for p, _ in jobs}) == len(jobs)
    before = metric(live, "molm_prefill_batch_size_count"), metric(live, "molm_prefill_batch_size_sum")
    with ThreadPoolExecutor(len(jobs)) as pool:
        with engine.lock:  # the scheduler is held: all of them wait for the same step
            futures = [pool.submit(live.complete, p, **s) for p, s in jobs]
            wait_until(lambda: len(engine.waiting) == len(jobs), "the requests to queue")
        results = [f.result().choices[0] for f in futures]
    assert metric(live, "molm_prefill_batch_size_count") - before[0] == 1  # one prefill forward ...
    assert metric(live, "molm_prefill_batch_size_sum") - before[1] == len(jobs)  # ... of every request
    for (prompt, s), choice in zip(jobs[:-1], results):
        assert choice.text == reference(model, tokenizer, prompt, s.pop("max_tokens"), **s)
    ids = tokenizer.encode(PROMPTS[1]).ids
    scored = results[-1].logprobs.token_logprobs
    assert results[-1].text == PROMPTS[1] and scored[0] is None
    assert torch.allclose(torch.tensor(scored[1:]), prompt_scores(model, ids), atol=1e-5)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_decodes(model, tokenizer):
    """With a budget of 16 prompt tokens a step, a 100-token prompt is prefilled in 7 chunks, one a step; the
    running request decodes a token after each chunk, and both return what molm.generate gives alone (scoring
    too)."""
    server = LiveServer(serve.create_app(model, tokenizer, NAME, max_batch=8, max_queue=8, prefill_tokens=16))
    engine, long_prompt = server.engine, " ".join(PROMPTS * 2)
    ids = tokenizer.encode(long_prompt).ids
    assert -(-len(ids) // 16) == 7  # 7 chunks of at most 16 tokens
    try:
        with Gate(engine) as gate, ThreadPoolExecutor(1) as pool:
            stream = iter(server.complete(PROMPTS[5], max_tokens=30, temperature=0, stream=True))
            pieces = [next(stream).choices[0].text]
            gate.wait_blocked(0)
            before = metric(server, "molm_prefill_batch_size_count")
            future = pool.submit(server.complete, long_prompt, max_tokens=12, temperature=0)
            wait_until(lambda: len(engine.waiting) == 1, "the long request to queue")
            gate.step(10_000)
            pieces += [c.choices[0].text for c in stream]
            text = future.result().choices[0].text
        assert metric(server, "molm_prefill_batch_size_count") - before == 7
        assert gate.batches[:8] == [1] * 7 + [2]  # A's step, 6 steps beside a chunk each, then both rows
        assert "".join(pieces) == reference(model, tokenizer, PROMPTS[5], 30)
        assert text == reference(model, tokenizer, long_prompt, 12)
        scored = server.complete(long_prompt, max_tokens=0, echo=True, logprobs=0).choices[0].logprobs
        # scored in 16-token chunks against one forward: other GEMM shapes, so bf16 logits can round one step apart
        # (0.125 for a logit between 16 and 32)
        atol = 1e-5 if model.dtype == torch.float32 else 0.125
        err = (torch.tensor(scored.token_logprobs[1:]) - prompt_scores(model, ids)).abs().max().item()
        assert err <= atol, err
    finally:
        server.close()


@pytest.mark.parametrize(
    "body, param",
    [
        ("{not json", None),
        ('["a list"]', None),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [4096]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [1] * 513}, "prompt"),  # one token more than the default model's context (256 + 256)
        ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 10**9}, "max_tokens"),
        ({"prompt": "a", "max_tokens": "3"}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "a", "temperature": -0.1}, "temperature"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "temperature": 10**400}, "temperature"),
        ({"prompt": "a", "model": 5}, "model"),
        ({"prompt": "a", "top_p": 0}, "top_p"),
        ({"prompt": "a", "top_p": 1.5}, "top_p"),
        ({"prompt": "a", "top_k": -2}, "top_k"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": True}, "n"),
        ({"prompt": "a", "seed": "x"}, "seed"),
        ({"prompt": "a", "seed": 2**64}, "seed"),
        ({"prompt": ["a"] * 10, "n": 7}, "n"),
        ({"prompt": "a", "stop": 3}, "stop"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "a", "logprobs": 6}, "logprobs"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "echo": 1}, "echo"),
        ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(live, body, param):
    response = live.post(body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert param in error["message"]


def test_unknown_model_and_path(live):
    with pytest.raises(openai.NotFoundError):
        live.client.completions.create(model="gpt-4", prompt="a", max_tokens=1)
    assert httpx.get(live.url + "/v2/nothing").status_code == 404


def test_a_failing_request_fails_alone(live, model, tokenizer):
    """An exception in one request's prefill answers it with a JSON error; the request prefilled in the same batch
    (retried alone) completes."""
    engine, poison = live.engine, tokenizer.encode(PROMPTS[2]).ids

    def forward(ids, mask, cache, logits_to_keep):
        if any(row[-len(poison) :] == poison for row in ids.tolist()):
            raise RuntimeError("injected failure")
        return type(engine)._forward(engine, ids, mask, cache, logits_to_keep)

    engine._forward = forward
    try:
        with ThreadPoolExecutor(2) as pool:
            with engine.lock:  # both queue before the next step: they are prefilled as one batch
                good = pool.submit(live.complete, PROMPTS[0], max_tokens=12, temperature=0)
                bad = pool.submit(live.post, {"prompt": PROMPTS[2], "max_tokens": 4})
                wait_until(lambda: len(engine.waiting) == 2, "both requests to queue")
            assert good.result().choices[0].text == reference(model, tokenizer, PROMPTS[0], 12)
            bad = bad.result()
    finally:
        del engine._forward
    assert bad.status_code == 500 and "injected failure" in bad.json()["error"]["message"]
    assert live.complete(PROMPTS[2], max_tokens=3, temperature=0).choices[0].text == reference(
        model, tokenizer, PROMPTS[2], 3
    )


def test_disconnect_mid_stream_frees_the_slot(live):
    engine = live.engine
    with Gate(engine) as gate:
        with httpx.stream(
            "POST",
            live.url + "/v1/completions",
            timeout=60,
            json={"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True},
        ) as r:
            next(r.iter_lines())  # the first token arrived
            gate.wait_blocked(0)  # the gate holds the first decode step
            (seq,) = engine.running
        wait_until(lambda: seq.cancelled, "the server to notice the disconnect")
        gate.step(1)  # the step in which the cancelled row leaves
        wait_until(lambda: not engine.running, "the row to leave the batch")
    assert seq.finish_reason == "cancelled" and len(seq.tokens) <= 2


def test_streams_are_not_held_back_by_nagle(live):
    """Each token of a stream is its own small write: the server's connections must have TCP_NODELAY, or on a
    kept-alive connection a write waits for the client's delayed ACK of the one before."""
    with httpx.Client(base_url=live.url, timeout=60) as client:
        for _ in range(2):  # the second request reuses the connection
            assert client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2}).status_code == 200
        connections = list(live.server.server_state.connections)
        assert connections
        for protocol in connections:
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_full_queue_answers_429(model, tokenizer):
    server = LiveServer(serve.create_app(model, tokenizer, NAME, max_batch=2, max_queue=3))
    try:
        with ThreadPoolExecutor(2) as pool:
            with server.engine.lock:  # the scheduler is held: nothing leaves the queue
                waiting = [pool.submit(server.complete, PROMPTS[0], max_tokens=4, temperature=0, n=n) for n in (1, 2)]
                wait_until(lambda: len(server.engine.waiting) == 3, "the queue to fill")
                with pytest.raises(openai.RateLimitError) as info:
                    server.complete(PROMPTS[1], max_tokens=4)
                assert info.value.body["code"] == "queue_full"
        assert [len(f.result().choices) for f in waiting] == [1, 2]
    finally:
        server.close()


def test_bounded_load(live, model, tokenizer):
    """32 clients x 2 requests: every request is answered once, with the length and text molm.generate gives.
    The first 32 are queued while the scheduler is held; they are prefilled a few per step (the prefill budget) and
    live long enough to decode together in batches of more than 16 rows."""
    jobs = [
        (f"{PROMPTS[i % len(PROMPTS)]} {word}", 8 + i % 7)
        for i, word in enumerate(
            (
                "and",
                "the",
                "of",
                "my",
                "thy",
                "good",
                "lord",
                "king",
                "sweet",
                "love",
                "night",
                "day",
                "death",
                "life",
                "heaven",
                "earth",
            )
            * 4
        )
    ]
    before = metric(live, "molm_requests_total"), wide_steps(live)
    with ThreadPoolExecutor(32) as pool:
        with live.engine.lock:
            futures = [
                pool.submit(lambda c: [live.complete(p, max_tokens=n, temperature=0) for p, n in jobs[c::32]], c)
                for c in range(32)
            ]
            wait_until(lambda: len(live.engine.waiting) == 32, "the first wave to queue")
        answers = [None] * len(jobs)
        for c, future in enumerate(futures):
            answers[c::32] = future.result()
    assert metric(live, "molm_requests_total") - before[0] == len(jobs)
    assert wide_steps(live) > before[1]
    assert len({a.id for a in answers}) == len(jobs)
    for (prompt, max_tokens), answer in zip(jobs, answers):
        choice = answer.choices[0]
        assert_greedy_equal_up_to_ties(
            model, tokenizer, prompt, choice.text, reference(model, tokenizer, prompt, max_tokens)
        )
        assert (answer.usage.completion_tokens == max_tokens) == (choice.finish_reason == "length")


def assert_greedy_equal_up_to_ties(model, tokenizer, prompt, served: str, alone: str):
    """Greedy text from a decode batch equals the lone request's, or first differs at a token where the two best
    logits of the lone request are equal in the model's dtype (bf16 logits have 8 significant bits): a batch of more
    than 16 rows runs lm_head as a GEMM, which sums in another order than the lone row's GEMV and can break an exact
    tie the other way."""
    if served == alone:
        return
    a, b = tokenizer.encode(prompt + served).ids, tokenizer.encode(prompt + alone).ids
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    with torch.no_grad():
        logits = model(torch.tensor([b[:first]])).logits[0, -1]
    best = logits.topk(2).values
    assert best[0] == best[1] and {a[first], b[first]} <= set(torch.nonzero(logits == best[0]).flatten().tolist()), (
        f"{prompt!r}: served {served!r} differs from {alone!r} at a token without a tie"
    )


def test_sigterm_finishes_in_flight_work_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "molm.cli", "serve", "--port", "0", "--max-batch", "4"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(tmp_path),
    )
    try:
        line = proc.stderr.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split("http://")[1].split("/v1")[0]
        with httpx.stream(
            "POST",
            f"http://{url}/v1/completions",
            timeout=120,
            json={"model": NAME, "prompt": "To be", "max_tokens": 200, "temperature": 0, "stream": True},
        ) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: {") and rest[-1] == "data: [DONE]"
        finish = json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"]
        assert finish in ("length", "stop")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc for the resident set size")
def test_64_clients_x_8_requests_every_answer_once_and_memory_flat(live):
    """A bounded load test: 64 concurrent clients send 8 requests each; every request is answered exactly once with
    the length it asked for, and the server's resident memory does not grow across the run (after a warm-up wave
    that reaches the same batch sizes)."""
    clients, per_client = 64, 8

    def wave(rounds):
        def client(c):
            return [
                (
                    1 + (c + r) % 4,
                    live.complete(PROMPTS[(c + r) % len(PROMPTS)], max_tokens=1 + (c + r) % 4, temperature=0),
                )
                for r in range(rounds)
            ]

        with ThreadPoolExecutor(clients) as pool:
            return [pair for result in pool.map(client, range(clients)) for pair in result]

    wave(1)  # warm-up: the allocator and the batch cache reach their working sizes
    rss_before, requests_before = _rss_bytes(), metric(live, "molm_requests_total")
    answers = wave(per_client)
    rss_growth = _rss_bytes() - rss_before
    assert metric(live, "molm_requests_total") - requests_before == clients * per_client
    assert len({answer.id for _, answer in answers}) == clients * per_client  # none lost, none duplicated
    for max_tokens, answer in answers:
        choice = answer.choices[0]
        assert len(answer.choices) == 1 and choice.finish_reason in ("length", "stop")
        assert (answer.usage.completion_tokens == max_tokens) == (choice.finish_reason == "length")
    assert rss_growth < 64 * 2**20, f"resident memory grew by {rss_growth / 2**20:.1f} MiB over {len(answers)} requests"
