"""The cache of every peer method, built from one dense prefill's K/V (and the presses' outputs).

Every method compresses the same layers: all of them on a model whose layers are all global, the
global (full-attention) layers only on a hybrid model (Gemma 3), whose sliding-window layers keep a
dense ``DynamicSlidingWindowLayer`` of 512 tokens in every method -- kvpress compresses only
Gemma 3's non-sliding layers and ``MustafarCache`` keeps sliding layers dense, so the peers follow
the same rule (:func:`compressed_layers`).
"""
from __future__ import annotations

import torch

from .accounting import fp16_dense_bytes, joint_bytes_ratio, tensor_bytes
from .specs import PeerSpec

__all__ = ["FP8Layer", "compressed_layers", "replay", "build_peer_cache", "prune_tok", "kivi_kept"]


def compressed_layers(model) -> list[bool]:
    """Per layer, whether the methods compress it: every layer unless the model mixes sliding and
    global layers (Gemma 3), where only the global ones."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    hybrid = "sliding_attention" in types and "full_attention" in types
    return [not (hybrid and t == "sliding_attention") for t in types]


def replay(cache, keys, values, n_tokens: int):
    """Feed per-layer K/V into ``cache`` and give sliding layers the context length they saw (a ``DynamicSlidingWindowLayer`` holds only
    its last ``window - 1`` tokens, and its masks need the full length ``n_tokens``)."""
    from ..runtime import restore_sliding_lengths

    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k.clone(), v.clone(), i)
    restore_sliding_lengths(cache, n_tokens)
    return cache


def _fp16_layer(cls):
    """A QuantizedLayer subclass whose storage is fp16 (K/V cast on the way in, back on the way out)."""
    class _Layer(cls):
        def update(self, key_states, value_states, cache_kwargs=None, *args, **kw):
            k, v = super().update(key_states.half(), value_states.half(), cache_kwargs, *args, **kw)
            return k.to(key_states.dtype), v.to(value_states.dtype)

        def storage(self):
            return {"q_keys": getattr(self, "_quantized_keys", None), "q_values": getattr(self, "_quantized_values", None),
                    "res_keys": self.keys, "res_values": self.values}
    _Layer.__name__ = "FP16" + cls.__name__
    return _Layer


def _fp8_layer_class():
    from transformers.cache_utils import DynamicLayer

    class FP8Layer(DynamicLayer):
        """K/V stored as float8_e4m3fn with one fp16 scale (amax / 448) per token vector; the token
        being added is returned in full precision (as QuantizedCache does), the past dequantized."""

        def __init__(self):
            super().__init__()
            self.cumulative_length = 0

        @staticmethod
        def _q(x):
            scale = (x.float().abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-8).half()
            return (x.float() / scale.float()).to(torch.float8_e4m3fn), scale

        @staticmethod
        def _dq(q, s, dtype):
            return (q.float() * s.float()).to(dtype)

        def update(self, key_states, value_states, cache_kwargs=None, *args, **kw):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.kq, self.ks = self._q(key_states)
                self.vq, self.vs = self._q(value_states)
                self.cumulative_length = key_states.shape[-2]
                return key_states, value_states
            K = torch.cat([self._dq(self.kq, self.ks, key_states.dtype), key_states], -2)
            V = torch.cat([self._dq(self.vq, self.vs, value_states.dtype), value_states], -2)
            kq, ks = self._q(key_states)
            vq, vs = self._q(value_states)
            self.kq, self.ks = torch.cat([self.kq, kq], -2), torch.cat([self.ks, ks], -2)
            self.vq, self.vs = torch.cat([self.vq, vq], -2), torch.cat([self.vs, vs], -2)
            self.cumulative_length += key_states.shape[-2]
            return K, V

        def get_seq_length(self):
            return self.cumulative_length

        def storage(self):
            return {"kq": self.kq, "ks": self.ks, "vq": self.vq, "vs": self.vs}

    return FP8Layer


def FP8Layer():  # noqa: N802 - a factory, the class needs transformers at import time
    """A fresh FP8 (e4m3, per-token-vector fp16 scale) cache layer (see :func:`_fp8_layer_class`)."""
    return _fp8_layer_class()()


def _qc_fp8_layer():
    """transformers' own ``Fp8QuantizedLayer`` (``QuantizedCache(backend="fp8")``: per-tensor scale
    calibrated on the first update and frozen, no residual), with a ``storage()`` for the byte count."""
    from transformers.cache_utils import Fp8QuantizedLayer

    class QCFp8Layer(Fp8QuantizedLayer):
        def storage(self):
            return {"q_keys": self._quantized_keys, "q_values": self._quantized_values}

    return QCFp8Layer()


def prune_tok(x, sparsity, window: int = 32):
    """Per-token magnitude pruning of all but the last ``window`` tokens (dense tensor, simulate)."""
    from mustafar.pruning import prune

    T = x.shape[-2]
    n = max(0, T - window)
    if n == 0:
        return x.clone()
    return torch.cat([prune(x[..., :n, :], sparsity, "per_token_magnitude"), x[..., n:, :]], -2)


def kivi_kept(x, sparsity, nbits, window: int = 32):
    """Per-token magnitude pruning, then asymmetric ``nbits`` quantization of each token vector's kept
    values (KIVI-style group = the kept values of one token vector; scale and minimum in fp16 over the
    kept values only); pruned entries stay 0, the last ``window`` tokens stay dense."""
    from mustafar.pruning import prune

    T = x.shape[-2]
    n = max(0, T - window)
    if n == 0:
        return x.clone()
    head = x[..., :n, :]
    _, mask = prune(head, sparsity, "per_token_magnitude", return_mask=True)
    big = torch.finfo(head.dtype).max
    mn = torch.where(mask, head, torch.full_like(head, big)).amin(-1, keepdim=True).half().float()
    mx = torch.where(mask, head, torch.full_like(head, -big)).amax(-1, keepdim=True)
    levels = 2 ** nbits - 1
    scale = ((mx - mn) / levels).clamp_min(1e-8).half().float()
    q = ((head - mn) / scale).round().clamp(0, levels)
    deq = torch.where(mask, q * scale + mn, torch.zeros_like(head))
    return torch.cat([deq.to(x.dtype), x[..., n:, :]], -2)


def _dense_cache(model, keys, values, n_tokens):
    from transformers import DynamicCache

    return replay(DynamicCache(config=model.config), keys, values, n_tokens)


def build_peer_cache(model, spec: PeerSpec, keys, values, comp: dict, max_len: int, n_tokens: int | None = None):
    """The cache of ``spec`` after the context prefill, and its ``bytes_ratio`` over the compressed
    layers (see :mod:`.accounting`).

    keys, values : the dense prefill's per-layer K/V (a sliding layer's: its last window - 1 tokens).
    comp : ``{(press, ratio): [(k, v) or None per layer]}`` from :func:`.presses.shared_prefill`.
    n_tokens : context length (default: the longest layer's).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

    D = keys[0].shape[-1]
    T = int(n_tokens or max(k.shape[-2] for k in keys))
    cl = compressed_layers(model)
    ckeys = [k for k, c in zip(keys, cl) if c]
    if spec.family == "dense":
        return _dense_cache(model, keys, values, T), 1.0
    if spec.family == "kvpress":
        kv = comp[(spec.method, spec.ratio)]
        ks = [kv[i][0] if c else k for i, (k, c) in enumerate(zip(keys, cl))]
        vs = [kv[i][1] if c else v for i, (v, c) in enumerate(zip(values, cl))]
        kept = sum(2 * kv[i][0].numel() for i, c in enumerate(cl) if c)
        return _dense_cache(model, ks, vs, T), kept / sum(2 * k.numel() for k in ckeys)
    if spec.family == "quant":
        sw = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
        if spec.method == "fp8":
            make = FP8Layer
        elif spec.method == "qc-fp8":
            make = _qc_fp8_layer
        else:
            from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

            base = _fp16_layer(QuantoQuantizedLayer if spec.method == "quanto" else HQQQuantizedLayer)
            make = lambda: base(spec.nbits, 0, 0, 64, 128)  # noqa: E731 - QuantizedCache's defaults
        layers = [make() if c else DynamicSlidingWindowLayer(sliding_window=sw) for c in cl]
        c = replay(Cache(layers=layers), keys, values, T)
        held = tensor_bytes([l.storage() for l, ok in zip(c.layers, cl) if ok])
        return c, held / fp16_dense_bytes(ckeys)
    if spec.family == "mustafar":
        from mustafar.format import format_bytes_ratio

        from ..runtime import CacheSpec, PrefillState, build_cache

        cs = CacheSpec(k_sparsity=spec.sparsity, v_sparsity=spec.sparsity)
        st = PrefillState(list(keys), list(values), None, torch.zeros(1), T)
        cache, _ = build_cache(model, st, cs, max_new_tokens=max_len)
        return cache, format_bytes_ratio(D, spec.sparsity)
    if spec.family == "joint" and spec.method == "tok+fp8":
        # the kernel issue's format: bitmap + e4m3 kept values + a float16 scale per token vector, in the real
        # compressed MustafarCache (the CPU op decodes it directly)
        import torch as _t

        from mustafar.format import format_bytes_ratio

        from ..runtime import CacheSpec, PrefillState, build_cache

        cs = CacheSpec(k_sparsity=spec.sparsity, v_sparsity=spec.sparsity, value_dtype="fp8_e4m3")
        st = PrefillState(list(keys), list(values), None, torch.zeros(1), T)
        cache, _ = build_cache(model, st, cs, max_new_tokens=max_len)
        return cache, format_bytes_ratio(D, spec.sparsity, value_dtype=_t.float8_e4m3fn)
    if spec.family == "joint" and spec.method == "tok+kivi":
        ks = [kivi_kept(k, spec.sparsity, spec.nbits) if c else k for k, c in zip(keys, cl)]
        vs = [kivi_kept(v, spec.sparsity, spec.nbits) if c else v for v, c in zip(values, cl)]
        return _dense_cache(model, ks, vs, T), joint_bytes_ratio(D, spec.sparsity, spec.nbits)
    if spec.family == "joint" and spec.method == "h2o+tok":
        from mustafar.format import format_bytes_ratio

        kv = comp[("ObservedAttention", spec.ratio)]
        ks = [prune_tok(kv[i][0], spec.sparsity) if c else k for i, (k, c) in enumerate(zip(keys, cl))]
        vs = [prune_tok(kv[i][1], spec.sparsity) if c else v for i, (v, c) in enumerate(zip(values, cl))]
        kept = sum(kv[i][0].numel() for i, c in enumerate(cl) if c) / sum(k.numel() for k in ckeys)
        return _dense_cache(model, ks, vs, T), kept * format_bytes_ratio(D, spec.sparsity)
    raise ValueError(f"unknown spec {spec}")
