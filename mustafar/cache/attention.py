"""The ``"mustafar"`` attention implementation registered with transformers.

Importing this module registers (its only side effect):

* ``AttentionInterface["mustafar"]`` -> :func:`mustafar_attention_forward`
* ``AttentionMaskInterface["mustafar"]`` -> :func:`mustafar_mask`

:func:`mustafar_mask` builds no mask for plain-causal decode steps (``q_len == 1``) whose keys are all
valid (``q_offset + 1 == kv_length``, as for a ``MustafarCache`` or a ``DynamicCache``): it returns ``None``
without padding, or an int32 ``kv_start [B]`` (first valid position of each sequence) for left padding.
Every other case (prefill, sliding layers, non-left padding, a preallocated cache such as transformers'
``StaticCache`` whose ``kv_length`` is its capacity) gets the usual sdpa mask.

:func:`mustafar_attention_forward` takes the layer's note from the model's :class:`~mustafar.cache.handoff.Handoff`
(left by ``MustafarCache.update``). A compressed decode step runs :func:`mustafar.ops.sparse_decode`
over the compressed store and the dense window (kernel ``MustafarConfig.decode_kernel``); everything
else goes to transformers' sdpa attention (a ``kv_start`` mask is expanded to a small ``[B, 1, 1, T]``
boolean mask first). When the note carries a layer with a query-driven strategy (``output_aware``,
``think``), the post-RoPE queries (and the mask / scale) are handed to it after attention
(:meth:`mustafar.cache.layers.MustafarLayerBase.consume_queries`).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from mustafar import format as fmt
from mustafar import ops
from mustafar.cache.handoff import Handoff

__all__ = ["mustafar_attention_forward", "mustafar_mask", "prepare_model", "ATTN_NAME", "HANDOFF_ATTR"]

ATTN_NAME = "mustafar"
HANDOFF_ATTR = "mustafar_handoff"  # attribute of every attention module of a prepared model


def _is_kv_start(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 1


def mustafar_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                  local_size: int | None = None, **kwargs):
    """Mask function of the ``"mustafar"`` implementation (see module docstring).

    Returns
    -------
    ``None`` | int32 ``kv_start [B]`` (decode, plain causal, left padding) | the sdpa mask otherwise.
    """
    plain_causal = mask_function is causal_mask_function or (
        local_size is not None and isinstance(q_offset, int) and q_offset + q_length <= local_size
        and getattr(mask_function, "__qualname__", "").startswith("sliding_window_causal_mask_function")
    )
    # every key position valid: the cache holds exactly the past plus this token (a StaticCache reports its
    # capacity as kv_length and, in transformers 5, a tensor q_offset: the sdpa mask handles it)
    all_valid = isinstance(q_offset, int) and q_offset + q_length == kv_length
    if q_length == 1 and plain_causal and all_valid and isinstance(kv_offset, int) and kv_offset == 0:
        if attention_mask is None:
            return None
        pm = attention_mask.to(torch.bool)
        if pm.dim() == 2 and pm.shape[-1] >= kv_length:
            pm = pm[:, :kv_length]  # [B, T]
            pos = torch.arange(kv_length, device=pm.device)
            # first valid position; a row with no valid position gets kv_length (everything masked)
            kv_start = torch.where(pm, pos, torch.full_like(pos, kv_length)).amin(dim=-1)  # [B]
            if bool((pm == (pos[None, :] >= kv_start[:, None])).all()):  # pure left padding
                if bool((kv_start == 0).all()):
                    return None
                return kv_start.to(torch.int32)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     local_size=local_size, **kwargs)


def _static_kv_start(mask) -> torch.Tensor | None:
    """``kv_start [B]`` of a compileable layer's decode step, without a host read.

    transformers builds a ``[B, 1, 1, capacity]`` boolean mask for such a step (as for its ``StaticCache``);
    with left padding (what ``generate`` produces) the first attended position of row ``b`` is ``kv_start[b]``.
    A mask of another shape than left padding + causal is not detected here (that would need a host read).
    """
    if mask is None:
        return None
    if _is_kv_start(mask):
        return mask
    m = mask[:, 0, -1, :]  # [B, T]: the last query row
    if m.dtype != torch.bool:
        m = m == 0  # additive float mask: 0 = attend
    return m.to(torch.int32).argmax(dim=-1).to(torch.int32)  # first attended position


def mustafar_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask, dropout: float = 0.0,
                               scaling: float | None = None, **kwargs):
    """Attention function of the ``"mustafar"`` implementation.

    Parameters
    ----------
    query : ``[B, H_q, q_len, D]``; key, value : ``[B, H_kv, T, D]`` (for a compressed decode step: the
        dense window; the compressed store comes with the handoff note).
    attention_mask : ``None``, int32 ``kv_start [B]`` or a 4D sdpa mask.

    Returns
    -------
    ``(attn_output [B, q_len, H_q, D], None)``
    """
    handoff = getattr(module, HANDOFF_ATTR, None)
    note = handoff.take(getattr(module, "layer_idx", None), key) if handoff is not None else None
    store = note.store if note is not None else None
    layer = note.layer if note is not None else None  # set by a layer with a query-driven strategy
    static = store is not None and store.get("lengths") is not None  # the compileable layer's decode step
    if static or (store is not None and query.shape[2] == 1 and (attention_mask is None or _is_kv_start(attention_mask))):
        if kwargs.get("softcap") is not None:
            raise ValueError("attention logit softcapping is not supported by the mustafar decode path")
        q = query[:, :, 0, :]  # [B, H_q, D]
        kv_start = _static_kv_start(attention_mask) if static else attention_mask
        out = ops.sparse_decode(q, store["k_bitmap"], store["k_values"], store["v_bitmap"], store["v_values"],
                                store["k_window"], store["v_window"], kv_start, scaling,
                                k_scale=store.get("k_scale"), v_scale=store.get("v_scale"), lengths=store.get("lengths"),
                                kernel=store["kernel"])  # [B, H_q, D]
        if layer is not None:  # scores from the dense window only (the compressed part is not re-read)
            layer.consume_queries(query, store["k_window"], attention_mask, scaling)
        return out.unsqueeze(1), None  # [B, 1, H_q, D]
    if store is not None:
        # slow path (a 4D mask in a decode step): decompress this layer for this call only
        d, dt = store["head_dim"], store["k_window"].dtype
        parts = []
        for w in ("k", "v"):
            sp = fmt.SparseKV(store[f"{w}_bitmap"], store[f"{w}_values"], d, scale=store.get(f"{w}_scale"))
            parts.append(torch.cat([fmt.decode(sp, dtype=dt), store[f"{w}_window"]], dim=2))
        key, value = parts
    given_mask = attention_mask
    if _is_kv_start(attention_mask):
        t = key.shape[2]
        pos = torch.arange(t, device=key.device)
        attention_mask = (pos[None, :] >= attention_mask.to(key.device).long()[:, None])[:, None, None, :]
        attention_mask = attention_mask.expand(-1, 1, query.shape[2], -1)  # [B, 1, q_len, T]
    out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 **kwargs)
    if layer is not None:
        # query-driven pruning: a multi-token call prunes now (after its dense attention); a decode step
        # adds its query to the window's scores
        layer.consume_queries(query, key, given_mask, scaling)
    return out


def prepare_model(model) -> Handoff:
    """Switch ``model`` to the ``"mustafar"`` attention implementation; return its handoff (idempotent).

    Every module with a ``layer_idx`` (the attention modules) gets the model's one
    :class:`~mustafar.cache.handoff.Handoff` as ``module.mustafar_handoff``.

    Raises
    ------
    ValueError if the model cannot change its attention implementation.
    """
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
            raise ValueError(
                f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface; "
                "MustafarCache cannot serve it"
            )
        try:
            model.set_attn_implementation(ATTN_NAME)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot set attn_implementation={ATTN_NAME!r} on {type(model).__name__}: {exc}") from exc
    mods = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    handoff = next((getattr(m, HANDOFF_ATTR) for m in mods if isinstance(getattr(m, HANDOFF_ATTR, None), Handoff)),
                   None) or Handoff()
    for m in mods:
        m.__dict__[HANDOFF_ATTR] = handoff  # a plain attribute (not a submodule / buffer / parameter)
    return handoff


AttentionInterface.register(ATTN_NAME, mustafar_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, mustafar_mask)
