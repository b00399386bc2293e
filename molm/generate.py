"""Generation: prefill, decode steps on a preallocated KV cache, sampling, stopping, streaming, tokenizer glue."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from .cache import KVCache
from .engine import DecodePlan, StaticDecoder
from .model import _serial_slices
from .tokenizer import load_tokenizer  # noqa: F401  (molm.load_tokenizer, callers below)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] float32 -> next ids [B]. temperature 0 = greedy (argmax); no host sync."""
    if temperature <= 0.0:
        return greedy_ids(logits)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest nucleus
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> argmax ids [B] (the first of equal maxima; NaN counts as the maximum, as torch.argmax), on
    the CPU over column slices that ATen reduces serially (no OpenMP region: see model.ATEN_PARALLEL_GRAIN)."""
    slices = _serial_slices(logits.shape[-1], logits.shape[0]) if logits.device.type == "cpu" else None
    if slices is None or len(slices) == 1:
        return logits.argmax(dim=-1)
    best = torch.stack([logits[:, cols].max(dim=-1).values for cols in slices], dim=-1)  # [B, slices]
    index = torch.stack([logits[:, cols].argmax(dim=-1) + cols.start for cols in slices], dim=-1)
    return index.gather(1, best.argmax(dim=-1, keepdim=True)).squeeze(1)


def penalize_repeats(
    logits: torch.Tensor,
    history: torch.Tensor,
    valid: torch.Tensor,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' repetition penalty and n-gram ban on next-token logits [B, V], on the device, no host sync.

    history [B, L]: each row's tokens so far (prompt + generated), valid [B, L] bool: False on left padding, which
    counts for neither. A token present in the row has its logit l turned into l / penalty if l > 0 else
    l * penalty; a token that would complete an n-gram already in the row is banned (logit -inf). `seen` is
    seen_tokens(history, valid, V), when the caller keeps it up to date.
    """
    if repetition_penalty != 1.0:
        if seen is None:
            seen = seen_tokens(history, valid, logits.shape[-1])
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if no_repeat_ngram_size > 0 and history.shape[1] >= no_repeat_ngram_size:
        logits = logits.masked_fill(
            _banned_ngram_tokens(history, valid, no_repeat_ngram_size, logits.shape[-1]), float("-inf")
        )
    return logits


def seen_tokens(history: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] bool: which token ids occur in each row's valid positions."""
    return _mark(torch.where(valid, history, vocab_size), vocab_size)


def _mark(columns: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] bool, True at the given columns [B, N]; column V is a spare one for entries that mark nothing.
    Every write is True, so duplicate columns cannot race."""
    marks = torch.zeros(columns.shape[0], vocab_size + 1, dtype=torch.bool, device=columns.device)
    return marks.scatter_(1, columns, True)[:, :vocab_size]


def _banned_ngram_tokens(history: torch.Tensor, valid: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """[B, V] bool: the last token of every earlier n-gram whose first n - 1 tokens equal the row's last n - 1."""
    length = history.shape[1]
    ngrams = history.unfold(1, n, 1)  # [B, L - n + 1, n]
    suffix = history[:, length - n + 1 :]  # [B, n - 1] (empty for n = 1: every earlier token is banned)
    # Left padding only: an n-gram is all real tokens when its first token is.
    match = (ngrams[:, :, :-1] == suffix[:, None, :]).all(dim=-1) & valid[:, : length - n + 1]
    return _mark(torch.where(match, ngrams[:, :, -1], vocab_size), vocab_size)


def _check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty=1.0, no_repeat_ngram_size=0):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be a non-negative integer (0 = off), got {no_repeat_ngram_size!r}")


@torch.inference_mode()
def generate_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    cuda_graphs: bool | None = None,
    compact_finished: bool = True,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> Iterator[torch.Tensor]:
    """Yields the next token ids [B] step by step. Rows that produced eos keep producing pad_token_id.

    input_ids [B, T] (left-padded when rows differ in length, with attention_mask [B, T]). Decode steps are
    replayed from CUDA graphs (`cuda_graphs`, default: on for a CUDA model with the extension backend); the
    prefill runs eagerly on the same preallocated cache, and so do the other decode steps, from a `DecodePlan` of
    the model read when generation starts (engine.py) where the model allows one. With `compact_finished`, once at
    most half of the rows still run, finished rows are dropped from the batch (cache rows selected, graphs
    recaptured), so they stop costing work. `repetition_penalty` and `no_repeat_ngram_size` follow transformers'
    definitions and look at each row's prompt (left padding excluded) and generated tokens.
    """
    _check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size)
    model.check_input_ids(input_ids)
    B, T = input_ids.shape
    device = model.device
    input_ids = input_ids.to(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda" and model.backend == "extension"
    cache = KVCache.for_model(model, B, T + max_new_tokens)
    full_mask = None
    if attention_mask is not None or cuda_graphs:
        full_mask = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=device)  # set column by column
        full_mask[:, :T] = 1 if attention_mask is None else attention_mask.to(device)
    decoder = StaticDecoder(model, cache, full_mask, cuda_graphs=True) if cuda_graphs else None
    plan = DecodePlan.capture(model) if decoder is None else None  # eager steps without the module walk
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    history = valid = seen = None  # what the repetition penalty and the n-gram ban look at
    if repetition_penalty != 1.0 or no_repeat_ngram_size > 0:
        history = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=device)
        history[:, :T] = input_ids
        valid = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
        if attention_mask is not None:
            valid[:, :T] = attention_mask.to(device).bool()
    if repetition_penalty != 1.0:  # kept up to date step by step rather than recomputed from the history
        seen = seen_tokens(input_ids, valid[:, :T], model.config.vocab_size)
    rows = None  # after compaction: the original row of each running row
    tokens = input_ids
    for step in range(max_new_tokens):
        if step > 0 and full_mask is not None:
            full_mask[:, T + step - 1] = 1
        if step > 0 and decoder is not None:
            logits = decoder.step(tokens, T + step - 1)
        elif step > 0 and plan is not None:
            logits = plan.step(tokens, cache, None if full_mask is None else full_mask[:, : cache.length + 1])
        else:
            mask = None if full_mask is None else full_mask[:, : cache.length + tokens.shape[1]]
            logits = model(
                tokens,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
                return_aux_loss=False,
                logits_to_keep=1,
            ).logits[:, -1]
        if history is not None:
            logits = penalize_repeats(
                logits, history[:, : T + step], valid[:, : T + step], repetition_penalty, no_repeat_ngram_size, seen
            )
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)  # [rows running]
        if history is not None:
            history[:, T + step] = next_ids
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        if eos_token_id is not None:
            next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
            finished |= next_ids == eos_token_id
        yield next_ids if rows is None else next_ids.new_full((B,), pad).index_copy_(0, rows, next_ids)
        tokens = next_ids[:, None]
        if eos_token_id is None:
            continue
        running = int((~finished).sum())  # the one host sync per step
        if running == 0:
            return
        if compact_finished and running <= finished.numel() // 2:
            keep = (~finished).nonzero().squeeze(1)
            cache.reorder(keep)
            full_mask = None if full_mask is None else full_mask.index_select(0, keep)
            tokens, finished = tokens.index_select(0, keep), finished.index_select(0, keep)
            if history is not None:
                history, valid = history.index_select(0, keep), valid.index_select(0, keep)
            if seen is not None:
                seen = seen.index_select(0, keep)
            rows = keep if rows is None else rows.index_select(0, keep)
            if decoder is not None:  # new buffers and batch size: new graphs
                decoder = StaticDecoder(model, cache, full_mask, cuda_graphs=True)


def check_tokenizer_fits(ids: list[int], vocab_size: int, what: str) -> None:
    """Token ids past the model's vocabulary mean the tokenizer belongs to another model: say so."""
    if ids and max(ids) >= vocab_size:
        raise ValueError(
            f"the tokenizer does not match the model: it encodes {what} to token id {max(ids)}, but "
            f"the model has only {vocab_size} tokens (pass the model's own tokenizer)"
        )


def _encode_batch(tokenizer, prompts: list[str], pad_id: int, vocab_size: int):
    encoded = [tokenizer.encode(p).ids for p in prompts]
    for text, ids in zip(prompts, encoded):
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
        check_tokenizer_fits(ids, vocab_size, "the prompt")
    T = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for row, ids in enumerate(encoded):  # left padding: the newest token of every row sits at the end
        input_ids[row, T - len(ids) :] = torch.tensor(ids)
        mask[row, T - len(ids) :] = 1
    return input_ids, (mask if any(len(ids) < T for ids in encoded) else None)


class _TextStream:
    """Incremental detokenisation: yields only complete new text (waits on a split UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


def _truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate(
    model,
    prompt,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    tokenizer=None,
    stream: bool = False,
    attention_mask: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
):
    """Generate from a ModuleFormerForCausalLM.

    prompt: LongTensor [B, T] -> LongTensor [B, T + n] (prompt included; rows that stopped at eos are padded with
    eos), or str / list[str] -> the generated text (str / list[str], prompt excluded). Batched text prompts of
    different lengths are left-padded with an attention mask. temperature 0 (the default) is greedy. `stop`
    strings end a row (the stop string is cut). stream=True returns an iterator of text pieces (one str prompt) or
    of next-id tensors [B] (tensor prompt). repetition_penalty > 1 makes every token already in the row (prompt or
    generated) less likely (transformers' definition: logit / p if logit > 0 else logit * p; 1 = off);
    no_repeat_ngram_size n > 0 bans any token that would repeat an n-gram of the row.
    """
    # Checked now, not at the first token of a stream.
    _check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size)
    config = model.config
    eos = config.eos_token_id if config.eos_token_id is not None and config.eos_token_id < config.vocab_size else None
    settings = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_token_id=eos,
        pad_token_id=config.pad_token_id,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    if isinstance(prompt, torch.Tensor):
        model.check_input_ids(prompt)
        _warn_if_beyond_context(config, prompt.shape[1])
        steps = generate_ids(model, prompt, attention_mask, **settings)
        if stream:
            return steps
        new = list(steps)
        if not new:
            return prompt.clone()
        return torch.cat([prompt.to(model.device), torch.stack(new, dim=1)], dim=1)
    if isinstance(prompt, str):
        prompts, single = [prompt], True
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts, single = list(prompt), False
    else:
        raise TypeError(
            "prompt must be a LongTensor [B, T], a non-empty str or a non-empty list of str, got "
            f"{type(prompt).__name__}"
        )
    if tokenizer is None:
        directory = getattr(model, "name_or_path", None)
        if directory is None:
            raise ValueError("text prompts need a tokenizer: pass tokenizer= or load the model with molm.load(dir)")
        tokenizer = load_tokenizer(directory)
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    pad_id = config.pad_token_id if config.pad_token_id is not None else (eos if eos is not None else 0)
    input_ids, mask = _encode_batch(tokenizer, prompts, pad_id, config.vocab_size)
    _warn_if_beyond_context(config, input_ids.shape[1])
    steps = generate_ids(model, input_ids, mask, **settings)
    if stream:
        if not single:
            raise ValueError("stream=True takes one str prompt")
        return _stream_text(steps, tokenizer, stop, eos)
    new_ids: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for next_ids in steps:
        for row, token in enumerate(next_ids.tolist()):
            if done[row] or token == eos:
                done[row] = True
                continue
            new_ids[row].append(token)
            if stop and _truncate_at_stop(tokenizer.decode(new_ids[row]), stop)[1]:
                done[row] = True
        if all(done):
            break
    texts = [_truncate_at_stop(tokenizer.decode(ids), stop)[0] for ids in new_ids]
    return texts[0] if single else texts


def _warn_if_beyond_context(config, prompt_length: int) -> None:
    """The model has no positions, so nothing stops a longer prompt, but it never saw one in training."""
    context = config.history_length + config.block_size
    if prompt_length > context:
        warnings.warn(
            f"the prompt is {prompt_length} tokens long, longer than the {context} tokens of context the "
            f"model was trained on (history_length + block_size): expect worse text",
            stacklevel=3,
        )


def _stream_text(steps, tokenizer, stop: list[str], eos: int | None) -> Iterator[str]:
    text_stream = _TextStream(tokenizer)
    held = ""  # text that could be the start of a stop string is held back until it is decided
    for next_ids in steps:
        token = int(next_ids[0])
        if token == eos:
            break
        held += text_stream.push(token)
        if stop:
            cut, stopped = _truncate_at_stop(held, stop)
            if stopped:
                if cut:
                    yield cut
                return
            keep = max((len(s) - 1 for s in stop), default=0)
            safe = held[: max(0, len(held) - keep)]
            held = held[len(safe) :]
            if safe:
                yield safe
        elif held:
            yield held
            held = ""
    if held:
        yield held
