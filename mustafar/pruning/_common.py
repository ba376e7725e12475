"""Shared validation and helpers of the pruning strategies.

Every strategy acts on one K or V tensor of shape ``[B, H_kv, T, D]`` and decides a boolean
keep-mask of the same shape; the pruned tensor is ``torch.where(mask, x, 0)``, so pruned entries are
exactly 0 and kept entries are bit-identical to the input (NaN and inf included).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

__all__ = ["kept_count", "pruned_count", "topk_mask", "check_input", "apply_mask", "group_channel_mask"]


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real):
        raise ValueError(f"sparsity must be a real number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def pruned_count(n: int, sparsity: float) -> int:
    """Number of entries zeroed out of ``n`` at ``sparsity``: ``floor(sparsity * n + 0.5)``."""
    s = _check_sparsity(sparsity)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"count must be a non-negative int, got {n!r}")
    return min(n, math.floor(s * n + 0.5))


def kept_count(head_dim: int, sparsity: float) -> int:
    """Kept values per token vector: ``k = D - floor(sparsity * D + 0.5)`` (round half up).

    Examples
    --------
    >>> kept_count(128, 0.7), kept_count(128, 0.5), kept_count(64, 0.0)
    (38, 64, 64)
    """
    return head_dim - pruned_count(head_dim, sparsity)


def check_input(x, sparsity, name: str = "x") -> float:
    """Validate a ``[B, H_kv, T, D]`` floating tensor and a sparsity; return the sparsity as float."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have rank 4 [B, H_kv, T, D], got rank {x.dim()} (shape {tuple(x.shape)})")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must have a floating dtype, got dtype {x.dtype}")
    return _check_sparsity(sparsity)


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


def apply_mask(x: torch.Tensor, mask: torch.Tensor, return_mask: bool):
    """``torch.where(mask, x, 0)`` (pruned entries exactly 0), plus the mask if asked."""
    out = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return (out, mask) if return_mask else out


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
