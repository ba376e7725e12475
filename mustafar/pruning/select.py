"""The one selection step of every pruning strategy: a score tensor -> a boolean keep-mask.

A strategy is a score function (``|x|`` for the magnitude strategies, ``|K| x`` windowed ``|Q|`` or
``|V| x`` attention received for output-aware, ``||Q_c|| ||K_c||`` per channel for ThinK) followed by
:func:`select` with its granularity:

=============== ==========================================================================
granularity     rule
=============== ==========================================================================
per_token       per row, keep the ``kept_count(D, s)`` largest scores (:func:`topk_mask`)
per_channel     per channel, within groups of ``group_size`` tokens (:func:`group_channel_mask`)
head_channels   score ``[B, H, D]``: keep whole channels per (sequence, head), for every token
2:4             keep the 2 largest of every 4 consecutive channels (sparsity fixed at 0.5)
=============== ==========================================================================

Tie rule (docs/design.md): of equal scores the lower index is pruned first; NaN counts as largest.
"""

from __future__ import annotations

import torch

from ._common import check_sparsity, kept_count, pruned_count

__all__ = ["select", "topk_mask", "group_channel_mask", "GRANULARITIES"]

GRANULARITIES = ("per_token", "per_channel", "head_channels", "2:4")


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in a sort-exact dtype (fp16/bf16 -> fp32, which is exact)."""
    a = x.abs()
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()
    return a


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of the ``k`` largest-magnitude entries of every row (last dim) of ``x``.

    Tie rule (docs/design.md): rows are sorted by ``|x|`` ascending with a *stable* sort, and the first
    ``D - k`` entries are pruned, so of equal magnitudes the lower channel index is pruned first.
    NaN counts as the largest magnitude (kept); ``-0.0`` and ``0.0`` tie.

    Parameters
    ----------
    x : Tensor ``[..., D]``, floating dtype (any rank >= 1). Also used on score tensors.
    k : int, ``0 <= k <= D``.

    Returns
    -------
    Tensor ``[..., D]`` bool, exactly ``k`` True per row.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of rank >= 1, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must have a floating dtype, got dtype {x.dtype}")
    d = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not (0 <= k <= d):
        raise ValueError(f"k must be an int in [0, {d}] (D={d}), got {k!r}")
    n = d - k
    mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    if n == 0 or x.numel() == 0:
        return mask
    # stable ascending sort: equal magnitudes keep channel order, so lower channels come first;
    # torch.sort orders NaN after +inf (largest).
    order = torch.sort(_magnitude(x), dim=-1, stable=True).indices  # [..., D]
    mask.scatter_(-1, order[..., :n], False)
    return mask


def _check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return group_size


def group_channel_mask(score: torch.Tensor, sparsity: float, group_size: int) -> torch.Tensor:
    """Per-channel keep-mask over groups of ``group_size`` consecutive tokens.

    Within each group of tokens (the last group may be shorter, with ``r`` tokens), for each channel
    the ``floor(sparsity * n_group + 0.5)`` entries with the smallest ``score`` are pruned (ties: lower
    token index pruned first, NaN largest).

    Parameters
    ----------
    score : Tensor ``[B, H_kv, T, D]`` floating.
    sparsity : float in [0, 1).
    group_size : int >= 1.

    Returns
    -------
    Tensor ``[B, H_kv, T, D]`` bool.
    """
    group_size = _check_group_size(group_size)
    B, H, T, D = score.shape
    mask = torch.empty(score.shape, dtype=torch.bool, device=score.device)
    n_full = (T // group_size) * group_size
    if n_full:
        g = score[:, :, :n_full].reshape(B, H, n_full // group_size, group_size, D)  # [B, H, nG, g, D]
        g = g.transpose(-1, -2)  # [B, H, nG, D, g]
        m = topk_mask(g, group_size - pruned_count(group_size, sparsity))
        mask[:, :, :n_full] = m.transpose(-1, -2).reshape(B, H, n_full, D)
    r = T - n_full
    if r:
        tail = score[:, :, n_full:].transpose(-1, -2)  # [B, H, D, r]
        mask[:, :, n_full:] = topk_mask(tail, r - pruned_count(r, sparsity)).transpose(-1, -2)
    return mask


def select(score: torch.Tensor, sparsity: float, granularity: str = "per_token", *, group_size: int = 32,
           tokens: int | None = None) -> torch.Tensor:
    """Keep-mask from a score (see the module docstring for the rules).

    Parameters
    ----------
    score : ``[B, H, T, D]`` floating (``[B, H, D]`` for ``"head_channels"``).
    sparsity : float in [0, 1): fraction pruned.
    granularity : one of :data:`GRANULARITIES`.
    group_size : tokens per group for ``"per_channel"``.
    tokens : ``T`` of the mask for ``"head_channels"`` (the channel set is expanded over T tokens).

    Returns
    -------
    bool ``[B, H, T, D]``.
    """
    s = check_sparsity(sparsity)
    if granularity == "per_token":
        return topk_mask(score, kept_count(score.shape[-1], s))
    if granularity == "per_channel":
        return group_channel_mask(score, s, group_size)
    if granularity == "head_channels":
        if tokens is None:
            raise ValueError("granularity='head_channels' needs tokens= (the T of the mask)")
        b, h, d = score.shape
        keep = topk_mask(score, kept_count(d, s))  # [B, H, D]
        return keep[:, :, None, :].expand(b, h, tokens, d)
    if granularity == "2:4":
        if s != 0.5:
            raise ValueError(f"granularity='2:4' has a fixed sparsity of 0.5, got sparsity={sparsity!r}")
        b, h, t, d = score.shape
        if d % 4:
            raise ValueError(f"granularity='2:4' needs D divisible by 4, got D={d}")
        return topk_mask(score.reshape(b, h, t, d // 4, 4), 2).reshape(b, h, t, d)
    raise ValueError(f"granularity={granularity!r} must be one of {GRANULARITIES}")
