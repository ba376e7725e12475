"""The dense baseline's attention for GQA models: sdpa with the query heads of a KV head packed as query rows.

Importing this module registers (its only side effect) ``AttentionInterface["sdpa_packed_gqa"]`` ->
:func:`packed_gqa_attention_forward` and ``AttentionMaskInterface["sdpa_packed_gqa"]`` -> transformers'
``sdpa_mask`` (the masks of plain ``"sdpa"``).

Why: in a decode step (one query token) with a mask, as every ``StaticCache`` step has, transformers' ``"sdpa"``
attention repeats K and V to all query heads (``repeat_kv``) before ``scaled_dot_product_attention`` when the step is
compiled (eager transformers >= 5.2x packs the heads instead, compiled it does not: ``is_torchdynamo_compiling``), so a
compiled ``StaticCache`` step of a model with G = H_q / H_kv query heads per KV head copies its whole cache G-fold
every layer and step (Llama-3-8B, G = 4: the cache read, four copies written and read again, ~9x the bytes of
reading it once). The compiled StaticCache baseline of
the benchmarks (``mustafar.bench.common.make_cache("static", ...)``) runs this function instead, so that
MustafarCache is compared with a dense decode that reads each K / V row once, as a user who knows this would set it up:
the G query heads of a KV head become G query rows of one sdpa call over that KV head (``[B, H_kv, G, D]``), the
``[B, 1, 1, T]`` mask broadcast over them. Prefill (several query tokens), MHA (G = 1), masks with a head dimension,
logit softcapping and attention sinks go to transformers' ``sdpa_attention_forward`` unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["ATTN_NAME", "packed_gqa_attention_forward"]

ATTN_NAME = "sdpa_packed_gqa"


def packed_gqa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, **kwargs):
    """``(attn_output [B, q_len, H_q, D], None)``; query ``[B, H_q, q_len, D]``, key / value ``[B, H_kv, T, D]``,
    ``attention_mask`` a 4D sdpa mask or ``None``."""
    b, h_q, q_len, d = query.shape
    h_kv = key.shape[1]
    packable = (q_len == 1 and h_q != h_kv and h_q % h_kv == 0 and kwargs.get("softcap") is None
                and kwargs.get("s_aux") is None  # attention sinks: not an sdpa feature, leave them to transformers
                and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)))
    if not packable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    g = h_q // h_kv
    q = query.reshape(b, h_kv, g, d)  # head h = kv * g + j (transformers' repeat_kv order) -> row j of KV head kv
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling)  # [B, H_kv, G, Dv]
    return out.reshape(b, h_q, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, packed_gqa_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
