"""The update -> attention handoff: per model, per cache, no tensor attributes, no process globals.

Tolerance: fp32 tiny models; logits of paths that compute the same thing agree within 1e-4.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

import mustafar
from mustafar import MustafarCache, MustafarConfig, cache_kwargs
from mustafar.cache.attention import HANDOFF_ATTR

SMALL = dict(local_window=4, compress_chunk=3)


def _step(model, cache, tok):
    return model(input_ids=tok, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]  # [B, V]


def _greedy(model, cache, ids, n):
    logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True).logits[:, -1]
    out = []
    for _ in range(n):
        tok = logits.argmax(-1, keepdim=True)  # [B, 1]
        out.append(logits)
        logits = _step(model, cache, tok)
    return torch.stack(out, 1)  # [B, n, V]


@torch.no_grad()
def test_two_caches_used_alternately_decode_correctly():
    """Two MustafarCaches of one model, stepped in turn, each equal the same cache decoded alone."""
    model, _ = mustafar.load_model("tiny-llama")
    g = torch.Generator().manual_seed(3)
    ids_a = torch.randint(3, model.config.vocab_size, (1, 30), generator=g)
    ids_b = torch.randint(3, model.config.vocab_size, (2, 23), generator=g)
    cfg_a = MustafarConfig(k_sparsity=0.7, v_sparsity=0.5, **SMALL)
    cfg_b = MustafarConfig(k_sparsity=0.5, v_sparsity=0.7, local_window=6, compress_chunk=4)
    alone_a = _greedy(model, MustafarCache(model, cfg_a), ids_a, 12)
    alone_b = _greedy(model, MustafarCache(model, cfg_b), ids_b, 12)
    ca, cb = MustafarCache(model, cfg_a), MustafarCache(model, cfg_b)
    assert ca.handoff is cb.handoff  # one channel per model, shared by its caches
    la = model(input_ids=ids_a, **cache_kwargs(model, ca), use_cache=True).logits[:, -1]
    lb = model(input_ids=ids_b, **cache_kwargs(model, cb), use_cache=True).logits[:, -1]
    got_a, got_b = [], []
    for _ in range(12):
        got_a.append(la)
        got_b.append(lb)
        la = _step(model, ca, la.argmax(-1, keepdim=True))
        lb = _step(model, cb, lb.argmax(-1, keepdim=True))
    assert ca.layers[0].n_c > 30 - 4 and cb.layers[0].n_c > 23 - 6  # decode-time chunks were compressed
    torch.testing.assert_close(torch.stack(got_a, 1), alone_a, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack(got_b, 1), alone_b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_nothing_attached_to_tensors_and_no_globals():
    import mustafar.cache.attention as attn
    import mustafar.cache.cache as cache_mod

    model, _ = mustafar.load_model("tiny-llama")
    cache = MustafarCache(model, MustafarConfig(**SMALL))
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    _greedy(model, cache, ids, 3)
    layer = cache.layers[0]
    for t in (layer.keys, layer.values, layer.k_win, layer.k_bitmap):
        assert not [a for a in vars(t) if a.startswith("_mustafar")]
    assert not hasattr(cache_mod, "PENDING_DECODE") and not hasattr(attn, "PENDING_DECODE")
    assert not cache.handoff._slots  # every note was taken by its attention call
    mods = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert mods and all(getattr(m, HANDOFF_ATTR) is cache.handoff for m in mods)


@torch.no_grad()
def test_attention_switched_away_is_detected():
    """A compressed cache whose decode step is not followed by the "mustafar" attention raises (no silent
    attention over the window only); a fresh cache after that works again."""
    model, _ = mustafar.load_model("tiny-llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 20))
    cache = MustafarCache(model, MustafarConfig(**SMALL))
    model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(RuntimeError, match="did not run through the 'mustafar' attention"):
            _step(model, cache, ids[:, -1:])
    finally:
        model.set_attn_implementation("mustafar")
    fresh = MustafarCache(model, MustafarConfig(**SMALL))
    _greedy(model, fresh, ids, 2)


@torch.no_grad()
def test_replay_then_discard_handoff():
    """update() without attention (a replay) leaves notes; discard_handoff() drops them."""
    model, _ = mustafar.load_model("tiny-llama")
    dyn = DynamicCache(config=model.config)
    ids = torch.randint(3, model.config.vocab_size, (1, 16))
    model(input_ids=ids, **cache_kwargs(model, dyn), use_cache=True)
    cache = MustafarCache(model, MustafarConfig(**SMALL))
    k0, v0 = dyn.layers[0].keys, dyn.layers[0].values
    cache.update(k0[:, :, :-1], v0[:, :, :-1], 0)
    cache.update(k0[:, :, -1:], v0[:, :, -1:], 0)  # a decode-step note nobody takes
    with pytest.raises(RuntimeError, match="discard_handoff"):
        cache.check_handoff()
    cache = MustafarCache(model, MustafarConfig(**SMALL))
    for i, layer in enumerate(dyn.layers):
        cache.update(layer.keys[:, :, :-1], layer.values[:, :, :-1], i)
        cache.update(layer.keys[:, :, -1:], layer.values[:, :, -1:], i)
        cache.discard_handoff()
    cache.check_handoff()  # nothing pending
    _step(model, cache, ids[:, -1:])


def test_cache_kwargs_spelling_warns_nowhere():
    """generate / forward with cache_kwargs() emit no deprecation warning on this transformers version."""
    model, _ = mustafar.load_model("tiny-llama")
    cache = MustafarCache(model, MustafarConfig(**SMALL))
    ids = torch.randint(3, model.config.vocab_size, (1, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                       max_new_tokens=3, do_sample=False, pad_token_id=0)
    (name,) = cache_kwargs(model, cache)
    import inspect

    assert name in inspect.signature(type(model).forward).parameters
