"""Per-channel magnitude pruning within groups of tokens (the paper's per-channel alternative)."""

from __future__ import annotations

import torch

from ._common import apply_mask, check_input
from .select import select


def per_channel_magnitude(
    x: torch.Tensor, sparsity: float, *, group_size: int = 32, return_mask: bool = False
):
    """Prune along tokens: per channel, zero the smallest-|x| fraction of each group of tokens.

    Tokens are split into consecutive groups of ``group_size`` (the last group holds the ``r < group_size``
    remaining tokens, if any). Within a group of ``n`` tokens every channel keeps
    ``n - floor(sparsity*n + 0.5)`` entries. Ties: lower token index pruned first; NaN kept.
    Note the rounding on short tail groups: a tail of one token is pruned entirely at
    ``sparsity >= 0.5`` (callers that keep recent tokens dense never hit this).

    Parameters
    ----------
    x : Tensor ``[B, H_kv, T, D]``, floating.
    sparsity : float in [0, 1).
    group_size : int >= 1, tokens per group (default 32).
    return_mask : bool, also return the bool keep-mask ``[B, H_kv, T, D]``.

    Returns
    -------
    Tensor ``[B, H_kv, T, D]`` of ``x.dtype`` (and the mask).
    """
    s = check_input(x, sparsity)
    mask = select(x, s, "per_channel", group_size=group_size)  # score = |x|
    return apply_mask(x, mask, return_mask)
