"""The prompt and its captured Q, K, V that notebooks 01 (KV distribution) and 02 (pruning
exploration) both start from.

Shapes follow docs/design.md: ``B`` batch, ``H_kv`` KV heads, ``H_q`` query heads, ``T`` tokens,
``D`` head_dim.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["prompt_ids", "capture_prompt"]

#: characters of text taken per requested token (English prose runs ~4 characters per token, so
#: twice that always yields enough tokens), plus a fixed margin.
_CHARS_PER_TOKEN = 8
_CHARS_MARGIN = 64


def prompt_ids(tokenizer, n_tokens: int, offset_chars: int = 0) -> torch.Tensor:
    """Token ids of real English prose shipped with Python (``mustafar.eval.texts``).

    Parameters
    ----------
    tokenizer : transformers tokenizer
    n_tokens : int
        Prompt length in tokens, >= 1.
    offset_chars : int
        Where in the text to start, >= 0 (different windows of the same document).

    Returns
    -------
    torch.Tensor
        int64 ``[1, n_tokens]``.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if not isinstance(offset_chars, int) or offset_chars < 0:
        raise ValueError(f"offset_chars must be a non-negative int, got {offset_chars!r}")
    from mustafar.eval.texts import prose_text

    text = prose_text()
    chunk = text[offset_chars: offset_chars + _CHARS_PER_TOKEN * n_tokens + _CHARS_MARGIN]
    ids = tokenizer(chunk, return_tensors="pt", add_special_tokens=False).input_ids  # [1, T']
    if ids.shape[1] < n_tokens:
        raise ValueError(f"n_tokens={n_tokens} is longer than the text from offset_chars={offset_chars} ({ids.shape[1]} tokens)")
    return ids[:, :n_tokens]


def capture_prompt(model, input_ids: torch.Tensor, layers: Sequence[int] | None = None) -> dict:
    """Post-RoPE Q, K, V of every (or the chosen) layer for one prompt, as float32 on CPU.

    Parameters
    ----------
    model : transformers causal LM
    input_ids : torch.Tensor
        int ``[B, T]``.
    layers : sequence of int, optional
        Layer indices to keep (default: every layer).

    Returns
    -------
    dict
        ``{layer: {"q": [B, H_q, T, D], "k": [B, H_kv, T, D], "v": [B, H_kv, T, D]}}``, layers
        ascending.
    """
    from mustafar.capture import capture_qkv

    qkv = capture_qkv(model, input_ids, layers=None if layers is None else [int(i) for i in layers])
    keep = sorted(qkv)
    return {li: {t: qkv[li][t].detach().float().cpu() for t in ("q", "k", "v")} for li in keep}
