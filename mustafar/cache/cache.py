"""``MustafarCache``: a transformers ``Cache`` holding a pruned, bitmap-compressed KV cache.

The schedule and memory layout of one layer are described in :mod:`mustafar.cache.layers`. This module
holds the model checks, the per-layer choice of cache layer, the handoff to the attention function
(:mod:`mustafar.cache.handoff`) and the byte accounting of the whole cache:

* :meth:`MustafarCache.nbytes` — compressed mode: every tensor the cache holds (buffers at capacity,
  windows, counters, query-scoring state). Simulate mode holds dense tensors; its ``nbytes()`` reports
  what compressed mode would hold for the same tokens (bitmaps + kept values of the compressed
  tokens, the dense window, counters; no capacity slack) so the two modes report comparable bytes.
* :meth:`MustafarCache.held_nbytes` — the bytes of the tensors actually held, in either mode.
* :meth:`MustafarCache.dense_nbytes` — what a ``DynamicCache`` holds for the same tokens.

Without ``max_cache_len`` a compressed ``MustafarCache`` never holds more than ``dense_nbytes()`` plus
a small constant per layer (< 16 window rows, 8 store rows, the 16-byte counter) whenever a bitmap row
is smaller than a dense row (:func:`mustafar.format.format_bytes`; e.g. sparsity >= 6.25 % at D=128
fp16). With ``max_cache_len`` it preallocates a fixed footprint like a ``StaticCache``; a warning says
when that footprint exceeds the ``StaticCache`` of the same length (short ``max_cache_len``).
"""

from __future__ import annotations

import inspect
import warnings

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, StaticSlidingWindowLayer

from mustafar import format as fmt
from mustafar.cache.attention import prepare_model
from mustafar.cache.layers import MustafarLayerBase, round_up
from mustafar.cache.static import MustafarStaticLayer, static_capable, static_layer_nbytes
from mustafar.cache.stores import MustafarLayer, MustafarSimulatedLayer
from mustafar.config import MustafarConfig

__all__ = ["MustafarCache", "cache_kwargs", "model_geometry", "preallocated_layer_nbytes"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MUSTAFAR_LAYERS = (MustafarLayerBase, MustafarStaticLayer)


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` with the keyword this transformers version's ``forward`` / ``generate`` takes.

    transformers >= 5.2x names it ``cache`` (``past_key_values`` still works there but warns); earlier
    versions only know ``past_key_values``. ``model.generate(**inputs, **cache_kwargs(model, cache))``
    runs without a deprecation warning on both.
    """
    params = inspect.signature(type(model).forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def _layer_types(config) -> tuple[list[str], list[dict]]:
    """Per-layer attention type and cache-layer kwargs (the rule of transformers' DynamicCache, version-stable)."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        if getattr(config, "sliding_window", None) is not None:
            types = ["sliding_attention"] * n
        elif getattr(config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            types = ["full_attention"] * n
    types = list(types)[:n]
    if getattr(config, "kv_sharing_modes", None) is not None:
        types = ["shared_kv" if m == "reuse" else t for t, m in zip(types, config.kv_sharing_modes)]
    kw = [{"sliding_window": config.sliding_window} if t == "sliding_attention" else {} for t in types]
    return types, kw


def model_geometry(model) -> dict:
    """Validate that ``model`` has a standard per-token KV cache MustafarCache can serve; return its geometry.

    Returns
    -------
    dict with ``layer_types``, ``layer_kwargs``, ``head_dim``, ``num_kv_heads``, ``dtype``, ``text_config``.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    cfg = model.config.get_text_config(decoder=True)
    for attr in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim"):
        if getattr(cfg, attr, None) is not None:
            raise ValueError(
                f"model type {cfg.model_type!r} uses latent/compressed attention ({attr}); MustafarCache needs a "
                "standard per-head K/V cache"
            )
    if getattr(cfg, "v_head_dim", None) not in (None, getattr(cfg, "head_dim", None)):
        raise ValueError(f"model type {cfg.model_type!r} has v_head_dim != head_dim; not supported")
    try:
        layer_types, layer_kwargs = _layer_types(cfg)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read the layer structure of model type {cfg.model_type!r}: {exc}") from None
    bad = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if bad:
        raise ValueError(
            f"model type {cfg.model_type!r} has layers of type {bad}; MustafarCache serves only attention layers "
            "with a standard KV cache (no state-space / linear-attention / shared or indexed caches)"
        )
    n_heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // n_heads if hidden and n_heads else None)
    if head_dim is None:
        raise ValueError(f"model type {cfg.model_type!r}: cannot determine head_dim")
    if head_dim % 64 != 0:
        raise ValueError(f"head_dim={head_dim} is not a multiple of 64; the bitmap format needs D in (64, 128, 256, ...)")
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    dtype = model.dtype
    if dtype not in _DTYPES:
        raise ValueError(f"model dtype {dtype} not supported: expected float16, bfloat16 or float32")
    return dict(layer_types=layer_types, layer_kwargs=layer_kwargs, head_dim=head_dim, num_kv_heads=n_kv,
                dtype=dtype, text_config=cfg)


def preallocated_layer_nbytes(config: MustafarConfig, batch: int, num_kv_heads: int, head_dim: int,
                              dtype: torch.dtype, max_cache_len: int) -> int:
    """Bytes one compressed layer of ``MustafarCache(..., max_cache_len=L)`` holds (no query-scoring state).

    Compileable layer (per-token magnitude on both sides, :class:`~mustafar.cache.static.MustafarStaticLayer`):
    :func:`~mustafar.cache.static.static_layer_nbytes`. Eager layer (other strategies): store
    ``round8(max(0, L - local_window))`` rows of K/V bitmaps (int64, ``D/64`` words) and kept values; window
    ``min(L, local_window + compress_chunk + 1)`` dense K/V rows; the 16-byte counter. ``tests/`` check it
    equals ``nbytes()`` of a real cache.
    """
    if static_capable(config):
        return static_layer_nbytes(config, batch, num_kv_heads, head_dim, dtype, max_cache_len)
    it = dtype.itemsize
    rows = round_up(max(0, max_cache_len - config.local_window))
    sparse_row = sum(fmt.format_bytes(head_dim, getattr(config, f"{w}_sparsity"), dtype, config.value_dtype(w))
                     for w in "kv")
    win = min(max_cache_len, config.local_window + config.compress_chunk + 1)
    return batch * num_kv_heads * (rows * sparse_row + win * 2 * head_dim * it) + 16


class MustafarCache(Cache):
    """A transformers ``Cache`` that prunes and (in ``"compressed"`` mode) bitmap-encodes K and V.

    ``MustafarCache(model, cfg)`` validates the model, builds one layer per decoder layer and switches
    the model to the ``"mustafar"`` attention implementation (registered by :mod:`mustafar.cache.attention`;
    it runs sdpa for every call it does not handle itself, so the model keeps working with other caches).

    Layers: ``full_attention`` -> :class:`~mustafar.cache.stores.MustafarLayer` (compressed) or
    :class:`~mustafar.cache.stores.MustafarSimulatedLayer`; ``sliding_attention`` in a hybrid model
    (Gemma 3) -> transformers' ``DynamicSlidingWindowLayer`` (dense, small by construction). A model whose
    every layer is sliding (Mistral-style) gets Mustafar layers and raises once the sequence would exceed
    its sliding window.

    Parameters
    ----------
    model : transformers ``PreTrainedModel`` (decoder-only, per-head K/V, head_dim multiple of 64,
        fp16/bf16/fp32).
    config : :class:`mustafar.MustafarConfig` (default: paper defaults, K=V=70%).
    max_cache_len : optional int, preallocate every layer for this many tokens (a fixed footprint,
        see :func:`preallocated_layer_nbytes`); otherwise buffers grow with the sequence.
    """

    def __init__(self, model, config: MustafarConfig | None = None, *, max_cache_len: int | None = None):
        if config is None:
            config = MustafarConfig()
        if not isinstance(config, MustafarConfig):
            raise ValueError(f"config must be a MustafarConfig, got {type(config).__name__}")
        if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int)
                                          or max_cache_len < 1):
            raise ValueError(f"max_cache_len={max_cache_len!r} must be a positive int or None")
        geo = model_geometry(model)
        self.config = config
        self.head_dim = geo["head_dim"]
        self.num_kv_heads = geo["num_kv_heads"]
        self.dtype = geo["dtype"]
        self.model_type = geo["text_config"].model_type
        types = geo["layer_types"]
        all_sliding = all(t == "sliding_attention" for t in types)
        layer_cls = MustafarLayer if config.mode == "compressed" else MustafarSimulatedLayer
        static = max_cache_len is not None and static_capable(config)
        if static:
            layer_cls = MustafarStaticLayer
        layers = []
        for t, kw in zip(types, geo["layer_kwargs"]):
            if t == "sliding_attention" and not all_sliding:
                layers.append(StaticSlidingWindowLayer(max_cache_len=max_cache_len, **kw) if static
                              else DynamicSlidingWindowLayer(**kw))
            else:
                layers.append(layer_cls(config, self.num_kv_heads, self.head_dim, self.dtype, max_cache_len,
                                        max_positions=kw.get("sliding_window") if t == "sliding_attention" else None))
        super().__init__(layers=layers)
        self._warn_if_oversized(max_cache_len)
        self.handoff = prepare_model(model)

    def _warn_if_oversized(self, max_cache_len) -> None:
        if max_cache_len is None or self.config.mode != "compressed":
            return
        ours = preallocated_layer_nbytes(self.config, 1, 1, self.head_dim, self.dtype, max_cache_len)
        ours -= 16 if not static_capable(self.config) else 0
        static = 2 * max_cache_len * self.head_dim * self.dtype.itemsize
        if ours > static:
            warnings.warn(
                f"MustafarCache(max_cache_len={max_cache_len}) preallocates {ours / static:.2f}x the bytes of a "
                f"StaticCache of the same length (its dense window of up to local_window + compress_chunk + 1 = "
                f"{self.config.local_window + self.config.compress_chunk + 1} rows dominates short lengths); "
                "omit max_cache_len to let the cache grow with the sequence",
                UserWarning, stacklevel=3)

    # -- Cache API
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"layer_idx={layer_idx} but this MustafarCache has {len(self.layers)} layers (built for another model?)"
            )
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if isinstance(layer, _MUSTAFAR_LAYERS) and layer.note is not None:
            note, layer.note = layer.note, None
            self.handoff.post(layer_idx, note, owner=self)
        return keys, values

    def check_handoff(self) -> None:
        """Raise if a compressed decode step's update was not followed by its ``"mustafar"`` attention call."""
        self.handoff.check(self)

    def discard_handoff(self) -> None:
        """Drop this cache's pending notes: call after ``update`` calls that no attention follows (replays, fills)."""
        self.handoff.clear(self)

    # -- accounting
    def _layer_tensors(self):
        for i, layer in enumerate(self.layers):
            if isinstance(layer, _MUSTAFAR_LAYERS):
                yield i, layer, layer.tensors()
            else:
                ts = {}
                if getattr(layer, "is_initialized", False) and layer.keys is not None:
                    ts = {"k_dense": layer.keys, "v_dense": layer.values}
                yield i, layer, ts

    def held_nbytes(self) -> int:
        """Bytes of every tensor the cache holds (buffers at capacity, windows, counters, scoring state; the
        compileable layer's value-buffer slack included)."""
        return sum(layer.held_nbytes() if isinstance(layer, MustafarStaticLayer) else sum(t.nbytes for t in ts.values())
                   for _, layer, ts in self._layer_tensors())

    def nbytes(self) -> int:
        """Compressed mode: :meth:`held_nbytes`. Simulate mode: the compressed-equivalent bytes (module docstring)."""
        if self.config.mode == "compressed":
            return self.held_nbytes()
        total = 0
        for _, layer, ts in self._layer_tensors():
            if not isinstance(layer, MustafarLayerBase):
                total += sum(t.nbytes for t in ts.values())
                continue
            if not layer.is_initialized:
                continue
            d, it, c = layer.head_dim, layer.dtype.itemsize, self.config
            row = sum(fmt.format_bytes(d, getattr(c, f"{w}_sparsity"), layer.dtype, c.value_dtype(w)) for w in "kv")
            per_head = layer.n_c * row + layer.n_w * 2 * d * it
            total += layer.batch_size * layer.num_kv_heads * per_head + layer.counts.nbytes
            total += sum(t.nbytes for n, t in ts.items() if n not in ("k_dense", "v_dense", "counts"))
        return total

    def dense_nbytes(self) -> int:
        """Bytes a ``DynamicCache`` would hold for the same tokens (sliding layers: what they hold now)."""
        total = 0
        for _, layer, ts in self._layer_tensors():
            if isinstance(layer, _MUSTAFAR_LAYERS):
                if layer.is_initialized:
                    n = int(layer.get_seq_length())
                    total += 2 * layer.batch_size * layer.num_kv_heads * n * layer.head_dim * layer.dtype.itemsize
            else:
                total += sum(t.nbytes for t in ts.values())
        return total

    def breakdown(self) -> dict:
        """Bytes by role (of the tensors held: :meth:`held_nbytes`).

        Returns
        -------
        dict with ``payload`` (stored values, at capacity), ``bitmaps`` (at capacity), ``payload_used`` /
        ``bitmaps_used`` (rows holding tokens), ``window`` (dense window buffers at capacity), ``dense``
        (simulate buffers and dense sliding layers), ``bookkeeping`` (counters, scoring state), ``total``
        (== held_nbytes()), ``reported`` (== nbytes()), ``dense_equivalent`` (== dense_nbytes()),
        ``compressed_tokens``, ``window_tokens``.
        """
        out = dict(payload=0, bitmaps=0, payload_used=0, bitmaps_used=0, window=0, dense=0, bookkeeping=0,
                   compressed_tokens=0, window_tokens=0)
        for _, layer, ts in self._layer_tensors():
            for name, t in ts.items():
                if name.endswith("_values") or name.endswith("_scales"):
                    out["payload"] += t.nbytes
                    out["payload_used"] += t[:, :, : layer.n_c].nbytes if t.shape[2] else 0
                elif name.endswith("_bitmap"):
                    out["bitmaps"] += t.nbytes
                    out["bitmaps_used"] += t[:, :, : layer.n_c].nbytes if t.shape[2] else 0
                elif name.endswith("_window"):
                    out["window"] += t.nbytes
                elif name.endswith("_dense"):
                    out["dense"] += t.nbytes
                else:
                    out["bookkeeping"] += t.nbytes
            if isinstance(layer, MustafarStaticLayer) and layer.is_initialized:
                out["bookkeeping"] += layer.held_nbytes() - sum(t.nbytes for t in ts.values())  # value-buffer slack
            if isinstance(layer, _MUSTAFAR_LAYERS) and layer.is_initialized:
                out["compressed_tokens"] = max(out["compressed_tokens"], layer.n_c)
                out["window_tokens"] = max(out["window_tokens"], layer.n_w)
        out["total"] = out["payload"] + out["bitmaps"] + out["window"] + out["dense"] + out["bookkeeping"]
        out["reported"] = self.nbytes()
        out["dense_equivalent"] = self.dense_nbytes()
        return out
