"""Capture the per-layer queries, keys and values a prompt produces (the one Q/K/V capture of the project).

:func:`recording_queries` switches a model, for the duration of a ``with`` block, to a recording
attention implementation: every attention call stores its post-RoPE queries (exactly the tensor
attention multiplies with K) and then runs transformers' sdpa attention. It works for every model that
dispatches attention through transformers' ``AttentionInterface``. :func:`capture_qkv` runs one
prefill forward inside it and returns, per decoder layer, those queries and the keys/values the
``DynamicCache`` stores (post-RoPE, exactly as cached; layers whose cache keeps only a sliding window
hold fewer than ``T`` tokens of K/V). The evaluation's prefill (:func:`mustafar.eval.runtime.prefill`)
uses the same recorder.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["capture_qkv", "attention_modules", "recording_queries"]

_RECORDER = "mustafar_capture"


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """Attention modules of a decoder-only model, by ``layer_idx``."""
    mods = {}
    for m in model.modules():
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "layer_idx", "head_dim")):
            mods[int(m.layer_idx)] = m
    if not mods:
        raise ValueError(f"no Llama-style attention modules (q_proj/k_proj/v_proj/layer_idx) found in {type(model).__name__}")
    return dict(sorted(mods.items()))


@contextlib.contextmanager
def recording_queries(model, layers=None):
    """Record every attention call's post-RoPE queries while the block runs.

    Parameters
    ----------
    model : a transformers model that dispatches attention through ``AttentionInterface``.
    layers : optional iterable of layer indices to record (default all).

    Yields
    ------
    dict ``layer_idx -> query [B, H_q, q_len, D]`` (detached; the last call of each layer). The model's
    attention implementation is restored afterwards.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    wanted = None if layers is None else {int(i) for i in layers}
    store: dict[int, torch.Tensor] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        idx = getattr(module, "layer_idx", None)
        if wanted is None or idx in wanted:
            store[idx] = query.detach()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_RECORDER, record)
    AttentionMaskInterface.register(_RECORDER, sdpa_mask)
    old = getattr(model.config, "_attn_implementation", None) or "sdpa"
    model.set_attn_implementation(_RECORDER)
    try:
        yield store
    finally:
        model.set_attn_implementation(old)


def _layer_kv(cache, i: int):
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[i].keys, layers[i].values
    return cache[i][0], cache[i][1]  # older legacy-style caches


@torch.no_grad()
def capture_qkv(model, input_ids: torch.Tensor, layers=None, *, attention_mask: torch.Tensor | None = None):
    """Run one prefill forward and return each layer's Q, K, V.

    Parameters
    ----------
    model : a transformers causal LM with Llama-style attention (``q_proj``, ``k_proj``, ``v_proj``).
    input_ids : LongTensor ``[B, T]`` on the model's device.
    layers : iterable of layer indices, or ``None`` for all layers.
    attention_mask : optional ``[B, T]`` padding mask passed to the model.

    Returns
    -------
    dict ``layer_idx -> {"q": [B, H_q, T, D], "k": [B, H_kv, T, D], "v": [B, H_kv, T, D]}`` in the
    model's dtype: ``q`` post-RoPE (what attention multiplies with K), ``k``/``v`` as cached
    (post-RoPE keys).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {shape}")
    mods = attention_modules(model)
    if layers is None:
        wanted = list(mods)
    else:
        wanted = sorted({int(i) for i in layers})
        bad = [i for i in wanted if i not in mods]
        if bad:
            raise ValueError(f"layers {bad} not in the model (layers 0..{max(mods)})")
    from transformers import Cache

    with recording_queries(model, wanted) as queries:
        # the model builds its DynamicCache itself (the kwarg is `cache` in transformers >= 5.2x and
        # `past_key_values` before, so we don't pass one)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    cache = out.get("cache", None)
    if cache is None:
        cache = out.get("past_key_values", None)
    if not isinstance(cache, Cache):
        raise ValueError(f"{type(model).__name__} returned no transformers Cache (got {type(cache).__name__})")

    result = {}
    for i in wanted:
        if i not in queries:
            raise ValueError(f"layer {i}: no attention call was recorded ({type(mods[i]).__name__})")
        k, v = _layer_kv(cache, i)
        result[i] = {"q": queries[i], "k": k, "v": v}
    return result
