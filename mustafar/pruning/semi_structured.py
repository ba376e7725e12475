"""2:4 semi-structured pruning along the channel dim."""

from __future__ import annotations

import torch

from ._common import apply_mask, check_input
from .select import select


def semi_structured_2_4(x: torch.Tensor, sparsity: float = 0.5, *, return_mask: bool = False):
    """Keep the 2 largest-magnitude of every 4 consecutive channels of each token vector.

    Parameters
    ----------
    x : Tensor ``[B, H_kv, T, D]``, floating, ``D % 4 == 0``.
    sparsity : must be 0.5 (the pattern fixes it); anything else raises ``ValueError``.
    return_mask : bool, also return the bool keep-mask.

    Returns
    -------
    Tensor ``[B, H_kv, T, D]`` of ``x.dtype`` (and the mask). Ties inside a group of 4: lower channel
    pruned first; NaN kept.
    """
    s = check_input(x, sparsity)
    if s != 0.5:
        raise ValueError(f"semi_structured_2_4 has a fixed sparsity of 0.5, got sparsity={sparsity!r}")
    if x.shape[-1] % 4:
        raise ValueError(f"semi_structured_2_4 needs head_dim D divisible by 4, got D={x.shape[-1]}")
    return apply_mask(x, select(x, s, "2:4"), return_mask)  # score = |x|
