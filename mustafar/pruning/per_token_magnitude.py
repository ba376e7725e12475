"""Per-token magnitude pruning: the MUSTAFAR paper's strategy."""

from __future__ import annotations

import torch

from ._common import apply_mask, check_input
from .select import select


def per_token_magnitude(x: torch.Tensor, sparsity: float, *, return_mask: bool = False):
    """Zero the ``floor(sparsity*D + 0.5)`` smallest-magnitude entries of every token vector.

    Parameters
    ----------
    x : Tensor ``[B, H_kv, T, D]``, floating (fp16, bf16, fp32, fp64). K or V.
    sparsity : float in [0, 1), fraction of each token vector zeroed.
    return_mask : bool, also return the keep-mask.

    Returns
    -------
    Tensor ``[B, H_kv, T, D]`` of ``x.dtype`` (pruned entries exactly 0, kept ones unchanged), and
    with ``return_mask`` a bool keep-mask of the same shape with exactly ``k = kept_count(D, s)``
    True per token vector. Ties: lower channel index pruned first; NaN is kept (largest).
    """
    s = check_input(x, sparsity)
    mask = select(x, s, "per_token")  # score = |x| (select ranks by magnitude)
    return apply_mask(x, mask, return_mask)
