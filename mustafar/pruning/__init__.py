"""KV-cache pruning strategies.

Every strategy acts on one K or V tensor ``[B, H_kv, T, D]`` (``sparsity`` = fraction zeroed) and
returns the pruned tensor (same shape and dtype; pruned entries exactly 0, kept entries unchanged),
and with ``return_mask=True`` also the bool keep-mask.

====================== ================================================================
name                   what
====================== ================================================================
per_token_magnitude    the paper's: per token vector, zero the ``floor(s*D+0.5)`` smallest |x|
per_channel_magnitude  per channel, within groups of ``group_size`` tokens
output_aware           |K| x windowed sum of |Q|, or |V| x attention received (``kind``, ``granularity``)
think                  ThinK-style structured: whole channels per head, query-driven score
semi_structured_2_4    2 kept of every 4 consecutive channels (sparsity fixed at 0.5)
====================== ================================================================

Each strategy is a score function followed by the one shared selection step
(:func:`mustafar.pruning.select.select`).

Tie rule (docs/design.md): of equal magnitudes the lower index is pruned first; NaN is kept.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from ._common import kept_count
from .select import select, topk_mask
from .output_aware import output_aware
from .per_channel_magnitude import per_channel_magnitude
from .per_token_magnitude import per_token_magnitude
from .semi_structured import semi_structured_2_4
from .think import think

__all__ = ["prune", "select", "STRATEGIES", "kept_count", "topk_mask"]

STRATEGIES: dict[str, Callable] = {
    "per_token_magnitude": per_token_magnitude,
    "per_channel_magnitude": per_channel_magnitude,
    "output_aware": output_aware,
    "think": think,
    "semi_structured_2_4": semi_structured_2_4,
}


def prune(x: torch.Tensor, sparsity: float, strategy: str = "per_token_magnitude", *, return_mask: bool = False, **kw):
    """Prune a K or V tensor with a named strategy.

    Parameters
    ----------
    x : Tensor ``[B, H_kv, T, D]``, floating.
    sparsity : float in [0, 1), fraction of entries zeroed.
    strategy : a key of ``STRATEGIES``.
    return_mask : bool, also return the bool keep-mask ``[B, H_kv, T, D]``.
    **kw : strategy options (e.g. ``q=``, ``kind=``, ``group_size=``, ``window=``).

    Returns
    -------
    Tensor, or ``(Tensor, mask)`` with ``return_mask=True``.
    """
    try:
        fn = STRATEGIES[strategy]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pruning strategy {strategy!r}; available: {sorted(STRATEGIES)}") from None
    params = inspect.signature(fn).parameters
    bad = sorted(set(kw) - set(params))
    if bad:
        opts = sorted(n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n != "return_mask")
        raise ValueError(f"strategy {strategy!r} takes no option(s) {bad}; its options: {opts}")
    return fn(x, sparsity, return_mask=return_mask, **kw)
