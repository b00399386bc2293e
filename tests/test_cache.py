"""The KV cache: one write path, and the fixed-shape decode window (what CUDA graphs replay) is the cache itself, so
length, crop, reorder and the legacy format mean the same during and after fixed-shape decoding."""

import os

import pytest
import torch

import molm
from molm.cache import KVCache
from molm.engine import StaticDecoder

from backends import BACKENDS

DATA = os.path.join(os.path.dirname(__file__), "data")


def filled_cache(shared_kv: bool, batch=3, length=5, capacity=12, width=4, n_layer=2, seed=0) -> KVCache:
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(n_layer, batch, capacity, width, shared_kv, torch.float32)
    for layer in range(n_layer):
        k = torch.randn(batch, length, width, generator=gen)
        v = None if shared_kv else torch.randn(batch, length, width, generator=gen)
        cache.append(layer, k, v)
    cache.advance()
    return cache


def assert_same_legacy(a, b, atol=0.0):
    assert len(a) == len(b)
    for (ka, va), (kb, vb) in zip(a, b):
        torch.testing.assert_close(ka, kb, rtol=0, atol=atol)
        torch.testing.assert_close(va, vb, rtol=0, atol=atol)


@pytest.mark.parametrize("shared_kv", [True, False])
def test_update_writes_at_the_given_positions(shared_kv):
    cache = filled_cache(shared_kv)
    before = [k.clone() for k in cache.keys]
    new_k = torch.full((3, 2, 4), 7.0)
    new_v = None if shared_kv else torch.full((3, 2, 4), -7.0)
    k, v = cache.update(1, new_k, new_v, torch.tensor([8, 2]), read=9)
    assert k.shape == (3, 9, 4) and k.data_ptr() == cache.keys[1].data_ptr()  # a view of the buffer, no copy
    expected = before[1].clone()
    expected[:, [8, 2]] = 7.0
    assert torch.equal(cache.keys[1], expected)
    assert torch.equal(cache.keys[0], before[0])  # other layers untouched
    if shared_kv:
        assert v is None
    else:
        assert torch.equal(v[:, 8], new_v[:, 0]) and torch.equal(v[:, 2], new_v[:, 1])
    assert cache.length == 5  # update writes; only append + advance move the length


@pytest.mark.parametrize("shared_kv", [True, False])
def test_fixed_window_writes_at_the_device_position_and_reads_the_window(shared_kv):
    cache = filled_cache(shared_kv)
    plain = filled_cache(shared_kv)
    new_k = torch.randn(3, 1, 4)
    new_v = None if shared_kv else torch.randn(3, 1, 4)
    with cache.fixed_window(8, torch.tensor([5])):
        assert cache.read_length(1) == 8
        k, v = cache.append(0, new_k, new_v)
        cache.advance()
        assert cache.length == 5  # a replayed step moves no host state: the caller sets it
    assert k.shape == (3, 8, 4)
    k_plain, v_plain = plain.append(0, new_k, new_v)  # the eager step writes the same position
    assert torch.equal(k[:, :6], k_plain) and torch.equal(cache.keys[0], plain.keys[0])
    assert (v is None) == shared_kv and (shared_kv or torch.equal(v[:, :6], v_plain))
    assert cache.window is None and cache.read_length(1) == 6  # back to eager steps


@pytest.mark.parametrize("shared_kv", [True, False])
def test_crop_reorder_and_legacy_inside_a_fixed_window_act_on_the_whole_cache(shared_kv):
    inside, outside = filled_cache(shared_kv), filled_cache(shared_kv)
    index = torch.tensor([2, 0])
    with inside.fixed_window(8, torch.tensor([5])):
        assert (inside.batch, inside.capacity, inside.length) == (outside.batch, outside.capacity, outside.length)
        assert_same_legacy(inside.to_legacy(), outside.to_legacy())
        inside.reorder(index)
        inside.crop(3)
        legacy = inside.to_legacy()
    outside.reorder(index)
    outside.crop(3)
    assert_same_legacy(legacy, outside.to_legacy())
    assert legacy[0][0].shape == (2, 3, 4)
    assert_same_legacy(inside.to_legacy(), outside.to_legacy())


def test_bad_fixed_windows_are_named():
    cache = filled_cache(True)
    with pytest.raises(ValueError, match="window 13 must be in 1..capacity"):
        with cache.fixed_window(13, torch.tensor([5])):
            pass
    with cache.fixed_window(8, torch.tensor([5])):
        with pytest.raises(ValueError, match="one new position per step, got 2"):
            cache.append(0, torch.zeros(3, 2, 4), None)
        with pytest.raises(RuntimeError, match="already inside a fixed window"):
            with cache.fixed_window(8, torch.tensor([6])):
                pass
    assert cache.window is None and cache.position is None


@torch.no_grad()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["molm-tiny-a", "molm-tiny-b"])
def test_fixed_shape_decode_leaves_the_cache_as_plain_decode_does(backend, name):
    """Fixed-shape steps give the plain steps' logits, and afterwards the cache has the same length and contents, and
    crop, reorder and plain steps continue from it exactly as from the plainly decoded cache."""
    model = molm.load(os.path.join(DATA, name), dtype=torch.float32, backend=backend)
    B, T, steps = 3, 6, 9
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    capacity = T + steps + 4
    mask = torch.zeros(B, capacity, dtype=torch.long)
    mask[:, :T] = 1
    mask[1, :2] = 0  # left padding
    plain, fixed = KVCache.for_model(model, B, capacity), KVCache.for_model(model, B, capacity)
    for cache in (plain, fixed):
        out = model(ids, attention_mask=mask[:, :T], past_key_values=cache, use_cache=True, return_aux_loss=False)
    decoder = StaticDecoder(model, fixed, mask, cuda_graphs=False, min_window=4)

    def plain_step(cache, tokens):
        S = cache.length + 1
        out = model(tokens[:, None], attention_mask=mask[:, :S], past_key_values=cache, return_aux_loss=False)
        return out.logits[:, -1]

    tokens = out.logits[:, -1].argmax(-1)
    for position in range(T, T + steps):
        mask[:, position] = 1
        expected = plain_step(plain, tokens)
        torch.testing.assert_close(decoder.step(tokens, position), expected, rtol=0, atol=1e-4)
        tokens = expected.argmax(-1)
    assert fixed.length == plain.length == T + steps
    assert_same_legacy(fixed.to_legacy(), plain.to_legacy(), atol=1e-5)

    for cache in (plain, fixed):  # roll back two positions, keep rows 2 and 0, then decode plainly
        cache.crop(T + steps - 2)
    keep = torch.tensor([2, 0])
    mask = mask.index_select(0, keep)
    mask[:, T + steps - 2 :] = 0
    tokens = tokens.index_select(0, keep)
    for cache in (plain, fixed):
        cache.reorder(keep)
    for position in range(T + steps - 2, T + steps + 2):
        mask[:, position] = 1
        expected = plain_step(plain, tokens)
        torch.testing.assert_close(plain_step(fixed, tokens), expected, rtol=0, atol=1e-4)
        tokens = expected.argmax(-1)
    assert_same_legacy(fixed.to_legacy(), plain.to_legacy(), atol=1e-5)
