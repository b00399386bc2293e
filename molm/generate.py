"""Generation: prefill, decode steps on a preallocated KV cache, sampling, stopping, streaming, tokenizer glue."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from .cache import KVCache
from .tokenizer import load_tokenizer  # noqa: F401  (molm.load_tokenizer, callers below)
from .engine import StaticDecoder


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] float32 -> next ids [B]. temperature 0 = greedy (argmax); no host sync."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
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


def _check_settings(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.inference_mode()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, cuda_graphs: bool | None = None,
                 compact_finished: bool = True) -> Iterator[torch.Tensor]:
    """Yields the next token ids [B] step by step. Rows that produced eos keep producing pad_token_id.

    input_ids [B, T] (left-padded when rows differ in length, with attention_mask [B, T]). Decode steps are
    replayed from CUDA graphs (`cuda_graphs`, default: on for a CUDA model with the extension backend); the
    prefill and CPU steps run eagerly on the same preallocated cache. With `compact_finished`, once at most half
    of the rows still run, finished rows are dropped from the batch (cache rows selected, graphs recaptured), so
    they stop costing work.
    """
    _check_settings(max_new_tokens, temperature, top_k, top_p)
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
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    rows = None  # after compaction: the original row of each running row
    tokens = input_ids
    for step in range(max_new_tokens):
        if step > 0 and full_mask is not None:
            full_mask[:, T + step - 1] = 1
        if step > 0 and decoder is not None:
            logits = decoder.step(tokens, T + step - 1)
        else:
            mask = None if full_mask is None else full_mask[:, : cache.length + tokens.shape[1]]
            logits = model(tokens, attention_mask=mask, past_key_values=cache, use_cache=True,
                           return_aux_loss=False, logits_to_keep=1).logits[:, -1]
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)  # [rows running]
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
            rows = keep if rows is None else rows.index_select(0, keep)
            if decoder is not None:  # new buffers and batch size: new graphs
                decoder = StaticDecoder(model, cache, full_mask, cuda_graphs=True)


def check_tokenizer_fits(ids: list[int], vocab_size: int, what: str) -> None:
    """Token ids past the model's vocabulary mean the tokenizer belongs to another model: say so."""
    if ids and max(ids) >= vocab_size:
        raise ValueError(f"the tokenizer does not match the model: it encodes {what} to token id {max(ids)}, but "
                         f"the model has only {vocab_size} tokens (pass the model's own tokenizer)")


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
        input_ids[row, T - len(ids):] = torch.tensor(ids)
        mask[row, T - len(ids):] = 1
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
        piece, self.sent = text[len(self.sent):], text
        return piece


def _truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate(model, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop: str | list[str] | None = None,
             tokenizer=None, stream: bool = False, attention_mask: torch.Tensor | None = None):
    """Generate from a ModuleFormerForCausalLM.

    prompt: LongTensor [B, T] -> LongTensor [B, T + n] (prompt included; rows that stopped at eos are padded with
    eos), or str / list[str] -> the generated text (str / list[str], prompt excluded). Batched text prompts of
    different lengths are left-padded with an attention mask. temperature 0 is greedy. `stop` strings end a row
    (the stop string is cut). stream=True returns an iterator of text pieces (one str prompt) or of next-id
    tensors [B] (tensor prompt).
    """
    _check_settings(max_new_tokens, temperature, top_k, top_p)  # now, not at the first token of a stream
    config = model.config
    eos = config.eos_token_id if config.eos_token_id is not None and config.eos_token_id < config.vocab_size else None
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    eos_token_id=eos, pad_token_id=config.pad_token_id)
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
        raise TypeError("prompt must be a LongTensor [B, T], a non-empty str or a non-empty list of str, got "
                        f"{type(prompt).__name__}")
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
        warnings.warn(f"the prompt is {prompt_length} tokens long, longer than the {context} tokens of context the "
                      f"model was trained on (history_length + block_size): expect worse text", stacklevel=3)


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
            held = held[len(safe):]
            if safe:
                yield safe
        elif held:
            yield held
            held = ""
    if held:
        yield held
