"""Capture the per-layer queries, keys and values a prompt produces.

``capture_qkv(model, input_ids)`` runs one prefill forward and returns, per decoder layer, the
post-RoPE queries the attention used and the keys/values the ``DynamicCache`` stores.

How: K and V are read from the cache the forward returns (post-RoPE, exactly as cached). Q is not
stored anywhere, so a forward pre-hook on every attention module records its ``hidden_states`` and
``position_embeddings`` and recomputes ``q = RoPE(q_norm?(q_proj(h)))`` with the module's own
``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2/3, Gemma3 and other Llama-family modules). As a
guard, K is recomputed the same way and compared with the cached K; a module this recipe does not
fit raises ``ValueError`` instead of returning wrong queries. Layers whose cache keeps only a
sliding window hold fewer than ``T`` tokens of K/V (and skip the guard).
"""

from __future__ import annotations

import sys

import torch

__all__ = ["capture_qkv", "attention_modules"]


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """Attention modules of a decoder-only model, by ``layer_idx``."""
    mods = {}
    for m in model.modules():
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "layer_idx", "head_dim")):
            mods[int(m.layer_idx)] = m
    if not mods:
        raise ValueError(f"no Llama-style attention modules (q_proj/k_proj/v_proj/layer_idx) found in {type(model).__name__}")
    return dict(sorted(mods.items()))


def _project(module, proj, norm_name, h, cos, sin):
    """``RoPE(norm(proj(h)))`` as ``[B, H, T, D]``."""
    x = proj(h).view(*h.shape[:-1], -1, module.head_dim).transpose(1, 2)  # [B, H, T, D]
    norm = getattr(module, norm_name, None)
    if norm is not None:
        x = norm(x)
    rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise ValueError(f"{type(module).__name__}: its module has no apply_rotary_pos_emb; capture_qkv cannot rebuild Q")
    x, _ = rope(x, x, cos, sin)
    return x


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

    captured: dict[int, dict] = {}
    handles = []

    def make_hook(idx):
        def hook(module, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            if pe is None:
                raise ValueError(f"layer {idx}: attention called without position_embeddings; capture_qkv needs RoPE models")
            cos, sin = pe
            captured[idx] = {
                "q": _project(module, module.q_proj, "q_norm", h, cos, sin),
                "_k": _project(module, module.k_proj, "k_norm", h, cos, sin),
            }

        return hook

    try:
        for i in wanted:
            handles.append(mods[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
        # the model builds its DynamicCache itself (the kwarg is `cache` in transformers >= 5.2x and
        # `past_key_values` before, so we don't pass one)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    finally:
        for hd in handles:
            hd.remove()
    cache = out.get("cache", None)
    if cache is None:
        cache = out.get("past_key_values", None)
    if not isinstance(cache, Cache):
        raise ValueError(f"{type(model).__name__} returned no transformers Cache (got {type(cache).__name__})")

    T = input_ids.shape[1]
    result = {}
    for i in wanted:
        k, v = _layer_kv(cache, i)
        q, k_re = captured[i]["q"], captured[i].pop("_k")
        if k.shape[-2] == T:
            scale = k.abs().amax().clamp_min(1e-6)
            tol = 1e-4 if k.dtype == torch.float32 else 2e-2
            if k_re.shape != k.shape or ((k_re - k).abs().amax() / scale) > tol:
                raise ValueError(
                    f"layer {i} ({type(mods[i]).__name__}): recomputed keys do not match the cache; "
                    "capture_qkv does not support this attention module"
                )
        result[i] = {"q": q, "k": k, "v": v}
    return result
