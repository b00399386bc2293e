"""`molm serve`: an OpenAI-compatible completions server with continuous batching (`pip install molm[serve]`).

One scheduler thread owns the model. The requests waiting at a scheduler step are prefilled together (one forward
over their left-padded prompts, bounded by a token budget per step; a longer prompt is prefilled in chunks over
several steps), then join the shared decode batch; finished, stopped and cancelled rows leave it. Rows of the
decode batch are left-padded with an attention mask, and the batch cache is rebuilt (rows right-aligned, padding
trimmed) whenever membership changes. Stick-breaking attention has no positions and a masked key adds exactly zero,
so a row's tokens do not depend on its neighbours: a greedy request returns what `molm.generate` returns for it
alone.
"""

import asyncio
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .engine import DecodePlan
from .generate import _truncate_at_stop, greedy_ids, load_tokenizer, sample_next

MAX_N = 64  # choices per request
MAX_STOPS = 4
MAX_LOGPROBS = 5


class ApiError(Exception):
    """An error answered as OpenAI's JSON body {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------- requests
@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's plus the top k
    echo: bool = False


def _typed(body: dict, name: str, kinds: tuple, default, what: str):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name, "invalid_type")
    return value


def _float(body: dict, name: str, default: float) -> float:
    try:
        return float(_typed(body, name, (int, float), default, "a number"))
    except OverflowError:
        raise ApiError(400, f"'{name}' is out of range", name, "invalid_value") from None


def parse_request(
    body, tokenizer, vocab_size: int, max_context: int, model_name: str
) -> tuple[list[list[int]], Sampling, dict]:
    """A completions request body -> (prompts as token ids, sampling settings, other options); ApiError if bad."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    if _typed(body, "model", (str,), model_name, "a string") != model_name:
        raise ApiError(
            404,
            f"model {body['model']!r} is not served here (this server has {model_name!r})",
            "model",
            "model_not_found",
        )
    integer = (int,)
    s = Sampling(
        max_tokens=_typed(body, "max_tokens", integer, 16, "an integer"),
        temperature=_float(body, "temperature", 1.0),
        top_p=_float(body, "top_p", 1.0),
        top_k=_typed(body, "top_k", integer, None, "an integer"),
        seed=_typed(body, "seed", integer, None, "an integer"),
        logprobs=_typed(body, "logprobs", integer, None, "an integer"),
        echo=_typed(body, "echo", (bool,), False, "a boolean"),
    )
    options = {
        "n": _typed(body, "n", integer, 1, "an integer"),
        "stream": _typed(body, "stream", (bool,), False, "a boolean"),
        "include_usage": _typed(
            _typed(body, "stream_options", (dict,), {}, "an object"), "include_usage", (bool,), False, "a boolean"
        ),
    }
    stop = _typed(body, "stop", (str, list), [], "a string or a list of strings")
    s.stop = [stop] if isinstance(stop, str) else stop
    if len(s.stop) > MAX_STOPS or not all(isinstance(x, str) for x in s.stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    s.stop = [x for x in s.stop if x]
    for name, ok, rule in (
        ("max_tokens", s.max_tokens >= 0, "must be >= 0"),
        ("temperature", 0.0 <= s.temperature <= 100.0, "must be in [0, 100]"),
        ("top_p", 0.0 < s.top_p <= 1.0, "must be in (0, 1]"),
        ("top_k", s.top_k is None or s.top_k >= -1, "must be >= 1 (or -1 / 0: off)"),
        ("n", 1 <= options["n"] <= MAX_N, f"must be in [1, {MAX_N}]"),
        ("seed", s.seed is None or -(2**63) <= s.seed < 2**63, "must be in [-2**63, 2**63)"),
        ("logprobs", s.logprobs is None or 0 <= s.logprobs <= MAX_LOGPROBS, f"must be in [0, {MAX_LOGPROBS}]"),
    ):
        if not ok:
            raise ApiError(400, f"'{name}' {rule}, got {body.get(name)}", name, "invalid_value")
    s.top_k = s.top_k if s.top_k and s.top_k > 0 else None
    for name, neutral in (
        ("presence_penalty", 0),
        ("frequency_penalty", 0),
        ("best_of", options["n"]),
        ("logit_bias", {}),
        ("suffix", ""),
    ):
        if body.get(name) not in (None, neutral):
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported")
    prompts = _prompt_ids(body.get("prompt"), tokenizer, vocab_size)
    for ids in prompts:
        if len(ids) > max_context:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens, more than the model's context of {max_context}",
                "prompt",
                "context_length_exceeded",
            )
        if len(ids) + s.max_tokens > max_context:
            raise ApiError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({s.max_tokens}) exceeds the model's "
                f"context of {max_context} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
    return prompts, s, options


def _prompt_ids(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> a list of non-empty token id lists."""

    def is_ids(x):
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str) or is_ids(prompt) and prompt:
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or is_ids(p) for p in prompt):
        raise ApiError(
            400,
            "'prompt' must be a non-empty string, a list of strings, a list of token ids or a list "
            "of lists of token ids",
            "prompt",
            "invalid_type",
        )
    out = []
    for p in prompt:
        ids = tokenizer.encode(p).ids if isinstance(p, str) else p
        if not ids:
            raise ApiError(400, "'prompt' is empty (it encodes to no tokens)", "prompt", "invalid_value")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(
                400,
                f"'prompt' has token id {bad[0]}, outside the vocabulary [0, {vocab_size})",
                "prompt",
                "invalid_token",
            )
        out.append(list(ids))
    return out


# --------------------------------------------------------------------------------------------------- scheduler
class QueueFull(Exception):
    pass


class Sequence:
    """One choice of one request: its prompt, settings, generator, tokens and the text released so far."""

    def __init__(self, index: int, prompt: list[int], sampling: Sampling, generator: torch.Generator, emit):
        self.index, self.prompt, self.sampling, self.generator, self.emit = index, prompt, sampling, generator, emit
        self.tokens: list[int] = []
        self.released = ""  # text already sent (a prefix of the final text)
        self.finish_reason: str | None = None
        self.cancelled = False
        self.cache_length = 0  # positions this sequence holds in its cache row
        self.row = 0  # its row in the decode batch (or in its prefill group's cache while prefilling)
        self.pending: int | None = None  # the sampled token not yet in the cache
        self.submitted = time.monotonic()
        self.prompt_logprobs: list = []  # with echo and logprobs: per prompt token, gathered chunk by chunk
        self.prompt_top: list = []

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling.echo and self.sampling.logprobs is not None


class PrefillGroup:
    """Sequences prefilled together: their prompts left-padded into one batch [B, T] with an attention mask, run
    through the model `chunk` columns per scheduler step (all of them at once unless a long prompt is alone)."""

    def __init__(self, model, sequences: list[Sequence], budget: int):
        self.sequences = sequences
        width = max(len(seq.prompt) for seq in sequences)
        self.ids = torch.zeros(len(sequences), width, dtype=torch.long)  # padding is masked: any id will do
        self.mask = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, seq in enumerate(sequences):
            self.ids[row, width - len(seq.prompt) :] = torch.tensor(seq.prompt)
            self.mask[row, width - len(seq.prompt) :] = 1
            seq.row = row
            seq.prompt_logprobs, seq.prompt_top = [None], [None]  # the first prompt token has no prediction
        self.ids, self.mask = self.ids.to(model.device), self.mask.to(model.device)
        self.cache = KVCache.for_model(model, len(sequences), width)
        self.chunk = max(1, budget // len(sequences)) if budget else width  # budget 0: all at once
        self.done = 0  # columns prefilled so far
        self.last_logits: torch.Tensor | None = None  # [B, V] of the last column run: the first token's

    @property
    def width(self) -> int:
        return self.ids.shape[1]


class Engine:
    """Owns the model in one scheduler thread: admits queued sequences, prefills them together, decodes them together.

    Each scheduler step runs at most `prefill_tokens` (batch x padded prompt length) of prefill, then one decode
    step of the running batch. The sequences waiting at a step are prefilled as one left-padded batch (as many as
    fit the budget and the free rows of `max_batch`); a prompt longer than the budget is prefilled alone, a chunk
    per step, so decoding goes on meanwhile. After its last chunk a group samples its first tokens and joins the
    decode batch in the same step.

    Events go to each sequence's `emit(event: dict)`, called from the scheduler thread: {"text", "token",
    "logprob", "top"} per token, {"prompt_logprobs"} for echo, {"finish"} at the end, {"error"} on a failure;
    `publish()` follows the prefills and each decode step (to hand their events over at once). `lock` is held for
    each scheduling step; holding it pauses the scheduler between steps.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 16,
        max_queue: int = 256,
        metrics=None,
        publish=None,
        prefill_tokens: int = 64,
    ):
        config = model.config
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.max_batch, self.max_queue, self.publish = max_batch, max_queue, publish or (lambda: None)
        self.prefill_tokens = prefill_tokens
        self.eos = (
            config.eos_token_id if config.eos_token_id is not None and config.eos_token_id < config.vocab_size else None
        )
        self.max_context = config.history_length + config.block_size
        self.waiting: deque[Sequence] = deque()
        self.prefilling: PrefillGroup | None = None
        self.running: list[Sequence] = []
        self.cache: KVCache | None = None  # the decode batch, one row per running sequence
        self.lock = threading.Lock()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="molm-scheduler", daemon=True)
        # decode steps from a plan read now: the served model is the engine's alone (prefills call the model)
        self.plan = DecodePlan.capture(model)

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def submit(self, sequences: list[Sequence]) -> None:
        with self.wake:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", None, "shutting_down", "server_error")
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull
            self.waiting.extend(sequences)
            self._gauge()
            self.wake.notify()

    def stop(self, timeout: float) -> None:
        """Stop admitting, let running sequences finish for up to `timeout` s, then cancel the rest."""
        with self.wake:
            self.stopping = True
            for seq in self.waiting:
                seq.cancelled = True
            self.wake.notify()
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            self.thread.join(0.05)
        group = self.prefilling
        for seq in list(self.running) + (group.sequences if group else []):
            seq.cancelled = True
        self.thread.join(5.0)

    def _gauge(self):
        if self.metrics:
            self.metrics.queue_depth.set(len(self.waiting))
            self.metrics.running.set(len(self.running))

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not (self.waiting or self.prefilling or self.running or self.stopping):
                    self.wake.wait()
                if self.stopping and not (self.prefilling or self.running) and all(s.cancelled for s in self.waiting):
                    for seq in self.waiting:
                        self._finish(seq, "cancelled")
                    self.waiting.clear()
                    self.publish()
                    return
            with self.lock, torch.inference_mode():
                try:
                    self._step()
                except Exception as exc:  # whatever else fails, fails the requests in flight, not the server
                    group, self.prefilling = self.prefilling, None
                    self._fail(self.running + (group.sequences if group else []), exc)
                    self.running, self.cache = [], None
            self.publish()

    def _step(self) -> None:
        if self.prefilling is None:
            self.prefilling = self._admit()
        joining = []  # (prefill cache, its rows that join the decode batch)
        if self.prefilling is not None:
            done = self._prefill(self.prefilling)
            if done is not None:
                self.prefilling, joining = None, done
        self._gauge()
        self.publish()
        leaving = [s for s in self.running if s.cancelled or s.finish_reason]
        for seq in leaving:
            if seq.finish_reason is None:
                self._finish(seq, "cancelled")
        if joining or leaving:
            self._rebuild([s for s in self.running if s not in leaving], joining)
        if self.running:
            try:
                self._decode()
            except Exception as exc:  # a failed batch step fails its rows, the server goes on
                self._fail(self.running, exc)
                self.running, self.cache = [], None
        self._gauge()

    def _admit(self) -> PrefillGroup | None:
        """The next prefill group: waiting sequences in arrival order while the padded batch fits the token budget
        and the decode batch has rows for them (a first prompt over the budget goes alone, in chunks)."""
        group, width = [], 0
        with self.wake:
            while self.waiting and len(self.running) + len(group) < self.max_batch:
                seq = self.waiting[0]
                if seq.cancelled:
                    self._finish(self.waiting.popleft(), "cancelled")
                    continue
                if seq.sampling.max_tokens == 0 and not seq.wants_prompt_logprobs:
                    self._finish(self.waiting.popleft(), "length")
                    continue
                wider = max(width, len(seq.prompt))
                if group and wider * (len(group) + 1) > self.prefill_tokens:
                    break
                group.append(self.waiting.popleft())
                width = wider
        return PrefillGroup(self.model, group, self.prefill_tokens) if group else None

    def _prefill(self, group: PrefillGroup) -> list[tuple[KVCache, list[Sequence]]] | None:
        """Run the group's next chunk. After the last one, sample each row's first token and return the sequences
        that go on decoding, with the cache that holds them (None while chunks remain). A failed batch is retried
        one sequence at a time, so that only the failing request fails."""
        if all(seq.cancelled for seq in group.sequences):
            for seq in group.sequences:
                self._finish(seq, "cancelled")
            return []
        try:
            self._prefill_chunk(group)
        except Exception as exc:
            if len(group.sequences) == 1:  # this request alone fails
                self._fail(group.sequences, exc)
                return []
            # each fits one chunk alone: it was part of a batch within the budget
            return [part for alone in group.sequences for part in self._prefill(PrefillGroup(self.model, [alone], 0))]
        return [(group.cache, self._first_tokens(group))] if group.done == group.width else None

    def _prefill_chunk(self, group: PrefillGroup) -> None:
        start, end = group.done, min(group.width, group.done + group.chunk)
        scoring = [seq for seq in group.sequences if seq.wants_prompt_logprobs]
        logits = self._forward(
            group.ids[:, start:end], group.mask[:, :end], group.cache, logits_to_keep=0 if scoring else 1
        )  # [B, end - start or 1, V]
        group.done = end
        if self.metrics:
            self.metrics.prefill_batch_size.observe(len(group.sequences))
        for seq in scoring:  # the log-probability of each prompt token that follows a column of this chunk
            first = max(start, group.width - len(seq.prompt))
            if first >= min(end, group.width - 1):
                continue
            logp = torch.log_softmax(logits[seq.row, first - start : min(end, group.width - 1) - start], dim=-1)
            following = group.ids[seq.row, first + 1 : first + 1 + logp.shape[0]]
            seq.prompt_logprobs += logp.gather(1, following[:, None])[:, 0].tolist()
            seq.prompt_top += self._top(logp, seq.sampling.logprobs)
        group.last_logits = logits[:, -1]

    def _first_tokens(self, group: PrefillGroup) -> list[Sequence]:
        joining = []
        logits = group.last_logits
        greedy = logits.argmax(dim=-1).tolist()
        for seq in group.sequences:
            seq.cache_length = len(seq.prompt)
            if seq.cancelled:
                self._finish(seq, "cancelled")
                continue
            try:
                if seq.wants_prompt_logprobs:
                    seq.emit({"prompt_logprobs": seq.prompt_logprobs, "prompt_top": seq.prompt_top})
                if seq.sampling.max_tokens == 0:
                    self._finish(seq, "length")
                    continue
                self._accept(seq, logits[seq.row : seq.row + 1], greedy[seq.row])
            except Exception as exc:  # this request alone fails
                self._fail([seq], exc)
                continue
            if self.metrics:
                self.metrics.ttft.observe(time.monotonic() - seq.submitted)
            if seq.finish_reason is None:
                joining.append(seq)
        return joining

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: KVCache, logits_to_keep: int) -> torch.Tensor:
        return self.model(
            ids,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            return_aux_loss=False,
            logits_to_keep=logits_to_keep,
        ).logits

    def _rebuild(self, staying: list[Sequence], joining: list[tuple[KVCache, list[Sequence]]]) -> None:
        """A new batch cache: each row right-aligned at the longest row's length, left padding masked. Rows come
        from the old batch cache (staying) and from prefill caches (joining), one gather per layer and source
        cache; columns left of every row's start are not copied."""
        parts = [(self.cache, staying)] + joining
        members = [seq for _, rows in parts for seq in rows]
        if not members:
            self.running, self.cache = [], None
            return
        length = max(seq.cache_length for seq in members)
        room = max(seq.sampling.max_tokens - len(seq.tokens) for seq in members) + 1
        cache = KVCache.for_model(self.model, len(members), length + room)
        top = 0
        for old, rows in parts:
            if not rows:
                continue
            index = torch.tensor([seq.row for seq in rows], device=self.model.device)
            n = min(length, old.length)
            for dst, src in zip(cache.keys + (cache.values or []), old.keys + (old.values or [])):
                dst[top : top + len(rows), length - n : length] = src[index, old.length - n : old.length]
            top += len(rows)
        for row, seq in enumerate(members):
            seq.row = row
        cache.length = length
        self.running, self.cache = members, cache

    def _decode(self) -> None:
        cache, rows = self.cache, self.running
        tokens = torch.tensor([[seq.pending] for seq in rows], dtype=torch.long, device=self.model.device)
        held = torch.tensor([seq.cache_length + 1 for seq in rows], device=self.model.device)
        positions = torch.arange(cache.length + 1, device=self.model.device)
        mask = (positions[None, :] >= cache.length + 1 - held[:, None]).long()  # [B, S + 1], left padding 0
        if self.plan is not None:
            logits = self.plan.step(tokens, cache, mask)
        else:
            logits = self._forward(tokens, mask, cache, logits_to_keep=1)[:, -1]
        if self.metrics:
            self.metrics.batch_size.observe(len(rows))
        greedy = greedy_ids(logits).tolist()
        for row, seq in enumerate(rows):
            seq.cache_length += 1
            self._accept(seq, logits[row : row + 1], greedy[row])

    def _top(self, logp: torch.Tensor, k: int) -> list:
        if not k:
            return [None] * logp.shape[0]
        values, ids = torch.topk(logp, k, dim=-1)
        return [
            {self.tokenizer.decode([i]): v for i, v in zip(r_ids, r_vals)}
            for r_ids, r_vals in zip(ids.tolist(), values.tolist())
        ]

    def _accept(self, seq: Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Sample the next token of `seq` from its logits [1, V]; release text; finish on eos, stop or length."""
        if seq.cancelled:
            return
        s = seq.sampling
        if s.temperature > 0 or greedy is None:
            token = int(sample_next(logits, s.temperature, s.top_k, s.top_p, seq.generator)[0])
        else:
            token = greedy
        if token == self.eos:
            self._finish(seq, "stop")
            return
        if self.metrics:
            self.metrics.generated_tokens.inc()
        seq.tokens.append(token)
        seq.pending = token
        event = {"token": token}
        if s.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            event["logprob"] = float(logp[0, token])
            event["top"] = self._top(logp, s.logprobs)[0]
        text, stopped = _truncate_at_stop(self.tokenizer.decode(seq.tokens), s.stop)
        done = stopped or len(seq.tokens) >= s.max_tokens
        end = len(text)
        if not done:  # hold back what could still become a stop string or an incomplete character
            end = min(end - max((len(x) - 1 for x in s.stop), default=0), len(text.rstrip("\ufffd")))
        event["text"] = text[len(seq.released) : max(end, len(seq.released))]
        seq.released += event["text"]
        seq.emit(event)
        if done:
            self._finish(seq, "stop" if stopped else "length")

    def _fail(self, sequences: list[Sequence], exc: Exception) -> None:
        for seq in sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "error"
                seq.emit({"error": f"{type(exc).__name__}: {exc}"})

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = reason
            seq.emit({"finish": reason})


# -------------------------------------------------------------------------------------------------------- HTTP
class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("molm_requests", "completion requests by outcome", ["outcome"], registry=r)
        self.queue_depth = Gauge("molm_queue_depth", "sequences waiting for a batch slot", registry=r)
        self.running = Gauge("molm_running_sequences", "sequences in the decode batch", registry=r)
        self.batch_size = Histogram(
            "molm_batch_size", "rows per decode step", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.prefill_batch_size = Histogram(
            "molm_prefill_batch_size",
            "rows per prefill forward",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.generated_tokens = Counter("molm_generated_tokens", "tokens sampled", registry=r)
        self.prompt_tokens = Counter("molm_prompt_tokens", "prompt tokens received", registry=r)
        self.ttft = Histogram("molm_time_to_first_token_seconds", "submission to first sampled token", registry=r)
        self.latency = Histogram("molm_request_duration_seconds", "completion request duration", registry=r)


class _Choice:
    """What the client gets for one choice, built from the engine's events."""

    def __init__(self, index: int, echo: str):
        self.index, self.text, self.finish_reason = index, echo, None
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.offset = 0  # text offset of the next token

    def add(self, tokens: list[str], logprobs: list, tops: list) -> dict:
        """Append tokens' logprobs; returns this part alone (for a stream chunk)."""
        part = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": []}
        for token in tokens:
            part["text_offset"].append(self.offset)
            self.offset += len(token)
        for key, values in part.items():
            self.logprobs[key] += values
        return part


def create_app(
    model,
    tokenizer,
    model_name: str,
    max_batch: int = 16,
    max_queue: int = 256,
    shutdown_timeout: float = 30.0,
    prefill_tokens: int = 64,
):
    """The FastAPI app; its scheduler starts and stops with the app's lifespan (app.state.engine)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException

    metrics = Metrics()
    outbox, loop = [], None  # a step's (queue, event) pairs, handed to the event loop in one call

    def deliver(batch):
        for queue, event in batch:
            queue.put_nowait(event)

    def flush():
        if outbox:
            batch = outbox.copy()
            outbox.clear()
            try:
                loop.call_soon_threadsafe(deliver, batch)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                pass

    engine = Engine(model, tokenizer, max_batch, max_queue, metrics, publish=flush, prefill_tokens=prefill_tokens)
    vocab_size, created = model.config.vocab_size, int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        nonlocal loop
        loop = asyncio.get_running_loop()
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, shutdown_timeout)

    app = FastAPI(title="molm", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        metrics.requests.labels("rejected" if exc.status == 429 else "invalid" if exc.status < 500 else "error").inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), code=code).body(), exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        return await api_error(request, ApiError(500, f"{type(exc).__name__}: {exc}", kind="server_error"))

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "stopping" if engine.stopping else "ok"}, 503 if engine.stopping else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "molm"}],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        started = time.monotonic()
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
        prompts, sampling, options = parse_request(body, tokenizer, vocab_size, engine.max_context, model_name)
        events = asyncio.Queue()

        def emitter(index):
            return lambda event: outbox.append((events, (index, event)))

        n, sequences, choices = options["n"], [], []
        if n * len(prompts) > max_queue:
            raise ApiError(400, f"{len(prompts)} prompts x n={n} completions exceed the queue of {max_queue}", "n")
        raw = body["prompt"]
        texts = [raw] if isinstance(raw, str) else raw if all(isinstance(x, str) for x in raw) else None
        for p, prompt in enumerate(prompts):
            echo = texts[p] if texts else tokenizer.decode(prompt)
            for j in range(n):
                generator = torch.Generator(device=model.device)
                generator.manual_seed(sampling.seed + j) if sampling.seed is not None else generator.seed()
                sequences.append(Sequence(p * n + j, prompt, sampling, generator, emitter(p * n + j)))
                choices.append(_Choice(p * n + j, echo if sampling.echo else ""))
        try:
            engine.submit(sequences)
        except QueueFull:
            raise ApiError(
                429, f"the queue is full ({max_queue} waiting): retry later", None, "queue_full", "rate_limit_error"
            ) from None
        metrics.prompt_tokens.inc(sum(map(len, prompts)))
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }

        def usage():
            completion = sum(len(seq.tokens) for seq in sequences)
            prompt = sum(map(len, prompts))
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        def update(index, event) -> dict | None:
            """Apply one event to its choice; the choice's stream chunk for it (None: nothing to send)."""
            choice, logprobs = choices[index], None
            if "error" in event:
                raise ApiError(500, event["error"], None, "generation_failed", "server_error")
            if event.get("finish") == "cancelled":
                raise ApiError(
                    503, "the server stopped before this completion finished", None, "cancelled", "server_error"
                )
            text = ""
            if "prompt_logprobs" in event:
                tokens = [tokenizer.decode([t]) for t in sequences[index].prompt]
                logprobs = choice.add(tokens, event["prompt_logprobs"], event["prompt_top"])
                text = choice.text
            if "token" in event:
                if sampling.logprobs is not None:
                    logprobs = choice.add([tokenizer.decode([event["token"]])], [event["logprob"]], [event["top"]])
                text = event["text"]
                choice.text += text
            choice.finish_reason = event.get("finish")
            if not (text or logprobs or choice.finish_reason):
                return None
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason}

        async def run():
            """Yields stream chunks until every choice has finished; cancels what is left if abandoned."""
            done = 0
            try:
                while done < len(sequences):
                    index, event = await events.get()
                    done += "finish" in event or "error" in event
                    chunk = update(index, event)
                    if chunk is not None:
                        yield chunk
                metrics.requests.labels("ok").inc()
                metrics.latency.observe(time.monotonic() - started)
            finally:
                for seq in sequences:
                    seq.cancelled = True

        if options["stream"]:

            async def sse():
                try:
                    if sampling.echo and sampling.logprobs is None:
                        for c in choices:
                            yield _sse(
                                {
                                    **head,
                                    "choices": [
                                        {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": None}
                                    ],
                                }
                            )
                    async for chunk in run():
                        yield _sse({**head, "choices": [chunk]})
                    if options["include_usage"]:
                        yield _sse({**head, "choices": [], "usage": usage()})
                    yield "data: [DONE]\n\n"
                except ApiError as exc:
                    metrics.requests.labels("error").inc()
                    yield _sse(exc.body())
                except asyncio.CancelledError:  # the client went away
                    metrics.requests.labels("cancelled").inc()
                    raise

            return StreamingResponse(sse(), media_type="text/event-stream")
        async for _ in run():
            pass
        return {
            **head,
            "choices": [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": c.logprobs if sampling.logprobs is not None else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": usage(),
        }

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port; the caller reads the port from getsockname)."""
    family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    # protocol TCP, not 0: asyncio sets TCP_NODELAY only on such sockets' connections, and without it a streamed
    # token waits for the client's delayed ACK of the previous write (40 ms) on a kept-alive connection
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)
    return sock


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_queue: int = 256,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    backend: str | None = None,
    quantize: str | None = None,
    shutdown_timeout: float = 30.0,
    model_name: str | None = None,
    prefill_tokens: int = 64,
) -> int:
    """Load the model and serve it until SIGTERM / SIGINT; returns 0 after a clean shutdown."""
    import sys

    import uvicorn

    from .loading import load

    if max_batch < 1 or max_queue < 1 or prefill_tokens < 1:
        raise ValueError(
            f"--max-batch, --max-queue and --prefill-tokens must be >= 1, got {max_batch}, {max_queue} and "
            f"{prefill_tokens}"
        )
    model = load(model_dir, dtype=dtype, device=device, backend=backend, quantize=quantize).eval()
    tokenizer = load_tokenizer(model.name_or_path)
    name = model_name or os.path.basename(os.path.normpath(model_dir))
    app = create_app(model, tokenizer, name, max_batch, max_queue, shutdown_timeout, prefill_tokens)
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = sock.getsockname()
    print(
        f"molm serve: {name} on http://{host}:{bound[1]}/v1 (max batch {max_batch}, queue {max_queue}, "
        f"prefill {prefill_tokens} tokens a step)",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout))
    # uvicorn re-raises the signal that stopped it once it has shut down; with a handler in place that is a no-op,
    # so a graceful SIGTERM ends the process with status 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    return 0
