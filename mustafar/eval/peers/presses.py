"""kvpress presses on one shared eager prefill (every press's ``compress`` from one forward hook).

A press's hook runs after the layer's attention, so the prefill is the same for every press and
sharing it is exact (``tests/test_peers.py`` checks it against ``with press(model): model.model(...)``).
Each press gets exactly the arguments kvpress's own ``BasePress.forward_hook`` passes
(``attentions`` only to ObservedAttention, which needs the eager attention matrix; ``None`` to the
others, as under sdpa). On a hybrid model only the global layers are hooked (kvpress's own rule for
Gemma 3, :func:`.caches.compressed_layers`).
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from .caches import compressed_layers
from .specs import PRESSES

__all__ = ["make_press", "multi_press", "shared_prefill"]


def make_press(name: str, cr: float):
    """A fresh kvpress press ``PRESSES[name]`` at compression ratio ``cr``."""
    import kvpress

    return getattr(kvpress, PRESSES[name])(compression_ratio=cr)


class _TypedRope(torch.nn.Module):
    """``rotary_emb(x, position_ids)`` for one layer type of a model whose rotary embedding takes
    ``layer_type`` (Gemma 3: global and sliding layers have different RoPE bases)."""

    def __init__(self, rope, layer_type: str):
        super().__init__()
        self.rope, self.layer_type = rope, layer_type

    def forward(self, x, position_ids):
        return self.rope(x, position_ids, layer_type=self.layer_type)


@contextlib.contextmanager
def multi_press(model, presses: dict, store: dict):
    """Register one forward hook per compressed attention layer that calls every press's ``compress``
    on the prefill's keys / values exactly as kvpress's ``BasePress.forward_hook`` would, storing the
    results in ``store[key][layer_idx] = (keys, values)``; the cache itself stays dense."""
    from kvpress import ObservedAttentionPress
    from kvpress.presses.base_press import is_prefilling
    from kvpress.utils import extract_keys_and_values

    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    for p in presses.values():
        p.post_init_from_model(model)
    for key in presses:
        store.setdefault(key, {})

    def hook(module, args, kwargs, output):
        hs = kwargs["hidden_states"]
        if not is_prefilling(kwargs["cache_position"], hs.shape[1]):
            return output
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        for key, p in presses.items():
            att = output[1] if isinstance(p, ObservedAttentionPress) else None
            store[key][module.layer_idx] = p.compress(module, hs, keys, values, att, kwargs)
        return output

    hooks = []
    cfg = model.config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(lm.layers)
    typed = "layer_type" in inspect.signature(lm.rotary_emb.forward).parameters
    try:
        for layer, on, t in zip(lm.layers, compressed_layers(model), types):
            if not on:
                continue
            # kvpress's own assignment; Gemma 3's rotary embedding also needs the layer's type (kvpress
            # 0.5.5 + transformers 5.2 raise in ExpectedAttention without it)
            layer.self_attn.rotary_emb = _TypedRope(lm.rotary_emb, t) if typed else lm.rotary_emb
            hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        yield store
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _attn(model, impl: str):
    old = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@torch.inference_mode()
def shared_prefill(model, context_ids, presses: dict):
    """Dense prefill of ``context_ids`` through ``model.model`` with every press's compress (eager
    attention when there are presses: ObservedAttention needs the attention matrix).

    Returns (dense_keys, dense_values, {key: [(k, v) per layer, None for uncompressed layers]})."""
    from transformers import DynamicCache

    store: dict = {}
    cache = DynamicCache(config=model.config)
    hooks = multi_press(model, presses, store) if presses else contextlib.nullcontext()
    with _attn(model, "eager" if presses else model.config._attn_implementation), hooks:
        model.model(input_ids=context_ids, past_key_values=cache)
    n = len(cache.layers)
    comp = {k: [store[k].get(i) for i in range(n)] for k in presses}
    return [l.keys for l in cache.layers], [l.values for l in cache.layers], comp
