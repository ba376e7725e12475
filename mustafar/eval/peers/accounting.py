"""Byte accounting of the peers (every cell's ``bytes_ratio``, ``bytes_ratio_cache`` and ``bytes_ratio_end``).

- ``bytes_ratio``: fp16 bytes per context token vector of the **compressed layers** relative to a dense
  fp16 cache, measured on the real tensors right after compression (kvpress: kept / all context
  tokens; quanto / HQQ / FP8: the quantized storage incl. scales, zeros and packing, no residual;
  MUSTAFAR: the bitmap format's ``8*W + 2*k`` per token vector, exactly the bytes of its fp16
  ``SparseKV`` tensors; joint: the same formula with packed codes + fp16 scale / minimum). This is
  the asymptotic (long-context) ratio and the x axis of the Pareto plot.
- ``bytes_ratio_cache``: the whole cache right after the context, every layer: on a model whose layers
  are all global it equals ``bytes_ratio``; on a hybrid model (Gemma 3: 15 of 18 layers keep a dense
  512-token sliding window in every method, as kvpress and ``MustafarCache`` do) it is
  ``(sum_compressed bytes_ratio * dense_l + sum_sliding dense_l) / sum dense_l`` over the layers'
  dense bytes for this context.
- ``bytes_ratio_end``: every tensor the cache holds at the end of decoding (windows, residuals, the
  question and answer tokens) over a dense cache of the same tokens in the same dtype (``None`` for
  the simulated joint cells, which hold dense tensors).
"""
from __future__ import annotations

import math

import torch

__all__ = ["tensor_bytes", "joint_bytes_ratio", "fp16_dense_bytes", "cache_bytes_ratio", "end_bytes"]


def tensor_bytes(obj) -> int:
    """Real bytes of every tensor in ``obj`` (tensors, tensor subclasses such as quanto's packed
    QTensors via ``__tensor_flatten__``, and lists / tuples / dicts of them)."""
    if isinstance(obj, torch.Tensor):
        flat = getattr(type(obj), "__tensor_flatten__", None)
        if flat is not None and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def joint_bytes_ratio(head_dim: int, sparsity: float, nbits: int) -> float:
    """fp16-relative bytes per token vector of pruning + group-wise quantized kept values:
    bitmap ``8*W`` + packed codes ``ceil(k*nbits/8)`` + fp16 scale and minimum (4 B) over ``2*D``."""
    from mustafar.format import kept_count

    W = head_dim // 64
    k = kept_count(head_dim, sparsity)
    return (8 * W + math.ceil(k * nbits / 8) + 4) / (2 * head_dim)


def fp16_dense_bytes(keys) -> int:
    """fp16 bytes of K and V of these per-layer key tensors (values have the same shape)."""
    return sum(2 * k.numel() * 2 for k in keys)


def cache_bytes_ratio(ratio: float, dense_tokens: list[int], compressed: list[bool]) -> float:
    """Whole-cache ratio: the compressed layers at ``ratio``, the others dense, weighted by each layer's
    dense token count (``dense_tokens[l]``: tokens a dense cache holds in layer ``l`` after the context;
    every layer has the same heads and head_dim)."""
    tot = sum(dense_tokens)
    if tot == 0:
        return 1.0
    return sum(n * (ratio if c else 1.0) for n, c in zip(dense_tokens, compressed)) / tot


def end_bytes(cache, keys, n_fed: int, context_tokens: int) -> tuple[int, int]:
    """(real bytes held at the end of decoding, dense bytes of the same tokens in the same dtype: the
    whole context plus the ``n_fed`` question / answer tokens; a sliding layer's dense count is what a
    ``DynamicSlidingWindowLayer`` holds)."""
    if hasattr(cache, "nbytes") and hasattr(cache, "dense_nbytes"):  # MustafarCache
        return int(cache.nbytes()), int(cache.dense_nbytes())
    real = dense = 0
    for l, k0 in zip(cache.layers, keys):
        per_tok = 2 * k0.shape[0] * k0.shape[1] * k0.shape[-1]  # K and V: B * H_kv * D each
        T = context_tokens + n_fed
        if getattr(l, "is_sliding", False):
            T = min(T, int(getattr(l, "sliding_window", T + 1)) - 1)  # it keeps window - 1 tokens
        if hasattr(l, "storage"):  # quantized / fp8 layers (ours): they store fp16
            real += tensor_bytes(l.storage())
            dense += T * per_tok * 2
        else:
            real += tensor_bytes([l.keys, l.values])
            dense += T * per_tok * l.keys.element_size()
    return real, dense
