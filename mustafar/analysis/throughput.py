"""Notebook 05 (``05_throughput_and_memory``), live part: cache memory after a prefill and decode
tokens/s, measured at small scale on a CPU (:func:`cache_memory`, :func:`decode_throughput`,
:func:`kv_geometry`, :func:`dense_cache_bytes`).

The notebook's recorded GPU end-to-end results are read by :mod:`mustafar.analysis.e2e_grid`.
Shapes follow docs/design.md: ``B`` batch, ``H_kv`` KV heads, ``T`` tokens, ``D`` head_dim.
"""

from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch

from mustafar.cache import cache_kwargs

__all__ = ["dense_cache_bytes", "kv_geometry", "decode_throughput", "cache_memory"]

#: random token ids are drawn this far from both ends of the vocabulary (away from special tokens).
_ID_MARGIN = 10

# --------------------------------------------------------------------------------------------------
# throughput and memory (CPU, small scale)
# --------------------------------------------------------------------------------------------------


def dense_cache_bytes(cache) -> int:
    """Bytes held by the key/value tensors of a transformers cache (e.g. ``DynamicCache``).

    Parameters
    ----------
    cache : transformers cache
        Its ``layers`` carry ``keys`` / ``values`` tensors ``[B, H_kv, T, D]``.

    Returns
    -------
    int
    """
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _cache_bytes(cache) -> int:
    """Bytes a cache holds: ``MustafarCache.nbytes()`` (buffers at capacity) or the dense tensors."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    return dense_cache_bytes(cache)


def _new_cache(model, config, max_cache_len: int | None = None):
    """A ``DynamicCache`` (``config`` None) or a ``MustafarCache`` of ``config`` for ``model``."""
    from transformers import DynamicCache

    if config is None:
        return DynamicCache(config=model.config)
    from mustafar import MustafarCache

    with warnings.catch_warnings():  # a short preallocation is bigger than a StaticCache: intended here
        warnings.filterwarnings("ignore", message=r"MustafarCache\(max_cache_len=", category=UserWarning)
        return MustafarCache(model, config, max_cache_len=max_cache_len)


@torch.inference_mode()
def decode_throughput(model, batch: int, prompt_len: int, new_tokens: int, config=None, seed: int = 0,
                      warmup: int = 2, prefill: str = "random") -> dict:
    """Greedy decode of ``new_tokens`` tokens after a ``prompt_len``-token context; only the decode
    steps are timed.

    Parameters
    ----------
    model : a transformers causal LM (on CPU here).
    batch, prompt_len, new_tokens : ints >= 1.
    config : ``None`` for a ``DynamicCache`` (dense), else a ``mustafar.cache.MustafarConfig``.
    warmup : decode steps run (and not timed) before timing.
    prefill : ``"random"`` (default): every layer's cache receives random ``K, V [B, H_kv, T, D]``
        through its normal multi-token ``update`` (what a prefill does; decode speed depends only on
        the shapes, and this skips the prefill matmuls that dominate a CPU run); ``"model"``: a real
        prefill forward of random token ids.

    Returns
    -------
    dict with ``cache, batch, prompt_len, new_tokens, decode_s, tokens_per_s, ms_per_step, cache_bytes``.
    """
    for name, val in (("batch", batch), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if prefill not in ("random", "model"):
        raise ValueError(f"prefill must be 'random' or 'model', got {prefill!r}")
    g = torch.Generator().manual_seed(seed)
    cache = _new_cache(model, config, prompt_len + warmup + new_tokens + 1)
    if prefill == "model":
        ids = torch.randint(_ID_MARGIN, model.config.vocab_size - _ID_MARGIN, (batch, prompt_len), generator=g)  # [B, T]
        out = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)  # [B, 1]
    else:
        n_layers, h_kv, d, dtype = kv_geometry(model)
        for li in range(n_layers):
            k = torch.randn(batch, h_kv, prompt_len, d, generator=g).to(dtype)  # [B, H_kv, T, D]
            v = torch.randn(batch, h_kv, prompt_len, d, generator=g).to(dtype)
            cache.update(k, v, li)
        nxt = torch.randint(_ID_MARGIN, model.config.vocab_size - _ID_MARGIN, (batch, 1), generator=g)  # [B, 1]
    for _ in range(warmup):
        out = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    dt = time.perf_counter() - t0
    return {
        "cache": "dense" if config is None else "mustafar",
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "decode_s": dt,
        "tokens_per_s": batch * new_tokens / dt,
        "ms_per_step": 1e3 * dt / new_tokens,
        "cache_bytes": _cache_bytes(cache),
    }


def kv_geometry(model) -> tuple[int, int, int, torch.dtype]:
    """KV geometry of a decoder-only transformers model.

    Parameters
    ----------
    model : transformers causal LM

    Returns
    -------
    (int, int, int, torch.dtype)
        Layers, ``H_kv``, ``D`` and the parameters' dtype.
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    h_q = cfg.num_attention_heads
    h_kv = getattr(cfg, "num_key_value_heads", None) or h_q
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h_q
    return cfg.num_hidden_layers, h_kv, d, next(model.parameters()).dtype


@torch.inference_mode()
def cache_memory(model, contexts: Sequence[int], config=None, batch: int = 1, seed: int = 0):
    """KV-cache bytes after a prefill of ``T`` tokens, for each ``T`` in ``contexts``.

    No forward pass is run: memory depends only on shapes, so every layer's cache receives random
    ``K, V [B, H_kv, T, D]`` (model dtype) through its normal multi-token ``update`` (what a prefill
    does). That makes long contexts cheap on a CPU.

    Parameters
    ----------
    model : transformers causal LM (its config and dtype give the cache geometry).
    contexts : prompt lengths ``T``.
    config : ``None`` for ``DynamicCache``, else a ``MustafarConfig`` (no ``max_cache_len``: the cache
        grows with the sequence, its window buffer sized to the window).
    batch : int >= 1.

    Returns
    -------
    DataFrame with columns ``cache, context, cache_bytes, dense_bytes, ratio`` (``ratio`` =
    cache bytes / the dense cache's bytes for the same tokens).
    """
    import pandas as pd

    from mustafar.format import nbytes_dense

    n_layers, h_kv, d, dtype = kv_geometry(model)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in contexts:
        t = int(t)
        if t < 1:
            raise ValueError(f"contexts must be positive ints, got {t!r}")
        cache = _new_cache(model, config)  # grows with the sequence: what a T-token conversation holds
        for li in range(n_layers):
            k = torch.randn(batch, h_kv, t, d, generator=g).to(dtype)  # [B, H_kv, T, D]
            v = torch.randn(batch, h_kv, t, d, generator=g).to(dtype)
            cache.update(k, v, li)
        dense = nbytes_dense((2, n_layers, batch, h_kv, t, d), dtype)  # K and V of every layer
        got = _cache_bytes(cache)
        rows.append({"cache": "dense" if config is None else "mustafar", "context": t,
                     "cache_bytes": got, "dense_bytes": dense, "ratio": got / dense})
    return pd.DataFrame(rows)
