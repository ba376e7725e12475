"""Bytes a MustafarCache holds: never more than the dense cache it replaces (beyond a small constant)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import mustafar
from mustafar import MustafarCache, MustafarConfig, cache_kwargs
from mustafar.cache import preallocated_layer_nbytes
from mustafar.format import format_bytes


def _const(cache) -> int:
    """The allowed slack per layer: < 16 dense window rows + 8 store rows + the counter."""
    layer = cache.layers[0]
    b, h, d, it = layer.batch_size, layer.num_kv_heads, layer.head_dim, layer.dtype.itemsize
    sparse_row = 2 * 8 * (d // 64) + (cache.config.kept("k", d) + cache.config.kept("v", d)) * it
    return len(cache.layers) * (b * h * (15 * 2 * d * it + 8 * sparse_row) + 16)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
@torch.no_grad()
def test_never_more_than_dynamic_cache(sparsity):
    """Short and long conversations (1 .. 700 tokens, default window 32 / chunk 256): nbytes() <= the
    DynamicCache of the same tokens + a small constant, at every step."""
    model, _ = mustafar.load_model("tiny-llama")
    cache = MustafarCache(model, MustafarConfig(k_sparsity=sparsity, v_sparsity=sparsity))
    dyn = DynamicCache(config=model.config)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (2, 5), generator=g)
    for c in (cache, dyn):
        model(input_ids=prompt, **cache_kwargs(model, c), use_cache=True)
    worst = -10**12
    for step in range(700):
        tok = torch.randint(3, model.config.vocab_size, (2, 1), generator=g)
        if step in (0, 1, 2, 10, 31, 32, 33, 100, 287, 288, 289, 290, 400, 545, 546, 699) or step % 97 == 0:
            worst = max(worst, cache.nbytes() - cache.dense_nbytes())
            assert cache.nbytes() <= cache.dense_nbytes() + _const(cache), step
            assert cache.dense_nbytes() == sum(l.keys.nbytes + l.values.nbytes for l in dyn.layers)
        for c in (cache, dyn):
            model(input_ids=tok, **cache_kwargs(model, c), use_cache=True)
    assert cache.layers[0].n_c > 256  # decode-time compression happened
    # the store's capacity slack never costs more than the dense bytes of the tokens it holds
    d = cache.head_dim
    sparse_row, dense_row = 2 * format_bytes(d, sparsity, torch.float32), 2 * d * 4
    for layer in cache.layers:
        assert layer.cap * sparse_row <= layer.n_c * dense_row + 8 * sparse_row
        assert layer.k_win.shape[2] < layer.n_w + 16


@pytest.mark.parametrize("max_len", [40, 300, 1000])
@torch.no_grad()
def test_preallocated_footprint_is_exact_and_warned(max_len):
    model, _ = mustafar.load_model("tiny-llama")
    cfg = MustafarConfig()
    d, it = 64, 4
    static = 2 * max_len * d * it
    plan = preallocated_layer_nbytes(cfg, 1, 1, d, torch.float32, max_len) - 16
    if plan > static:
        with pytest.warns(UserWarning, match="StaticCache"):
            cache = MustafarCache(model, cfg, max_cache_len=max_len)
    else:
        cache = MustafarCache(model, cfg, max_cache_len=max_len)
    ids = torch.randint(3, model.config.vocab_size, (3, min(20, max_len)))
    model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    layer = cache.layers[0]
    want = preallocated_layer_nbytes(cfg, 3, layer.num_kv_heads, d, torch.float32, max_len) * len(cache.layers)
    assert cache.nbytes() == want
    assert (plan > static) == (max_len < 1000)  # the window dominates short preallocations
