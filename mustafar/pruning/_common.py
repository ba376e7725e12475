"""Shared validation of the pruning strategies and the final masking step.

Every strategy acts on one K or V tensor of shape ``[B, H_kv, T, D]``: a score function, then the one
shared selection step (:mod:`mustafar.pruning.select`) decides a boolean keep-mask of the same shape;
the pruned tensor is ``torch.where(mask, x, 0)``, so pruned entries are exactly 0 and kept entries
are bit-identical to the input (NaN and inf included).
"""

from __future__ import annotations

import math
from numbers import Real

import torch


__all__ = ["kept_count", "pruned_count", "check_input", "apply_mask", "check_sparsity"]


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real):
        raise ValueError(f"sparsity must be a real number in [0, 1), got {sparsity!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def kept_count(head_dim: int, sparsity: float) -> int:
    """Kept values per token vector: ``k = D - floor(sparsity * D + 0.5)`` (round half up).

    The one kept count of the project (pruning, :mod:`mustafar.format`'s byte accounting and the cache
    use it; ``mustafar.format.kept_count`` is this function). ``head_dim`` may be any non-negative count
    (pruning also applies it to rows of other lengths); the bitmap layout itself needs ``D`` a
    multiple of 64.

    Examples
    --------
    >>> kept_count(128, 0.7), kept_count(128, 0.5), kept_count(64, 0.0)
    (38, 64, 64)
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 0:
        raise ValueError(f"head_dim={head_dim!r} must be a non-negative int")
    if isinstance(sparsity, bool) or not isinstance(sparsity, Real) or not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be a number in [0, 1]")
    return head_dim - min(head_dim, math.floor(float(sparsity) * head_dim + 0.5))


def pruned_count(n: int, sparsity: float) -> int:
    """Number of entries zeroed out of ``n`` at ``sparsity``: ``floor(sparsity * n + 0.5)``."""
    s = check_sparsity(sparsity)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"count must be a non-negative int, got {n!r}")
    return n - kept_count(n, s)


def check_input(x, sparsity, name: str = "x") -> float:
    """Validate a ``[B, H_kv, T, D]`` floating tensor and a sparsity; return the sparsity as float."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have rank 4 [B, H_kv, T, D], got rank {x.dim()} (shape {tuple(x.shape)})")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must have a floating dtype, got dtype {x.dtype}")
    return check_sparsity(sparsity)


def apply_mask(x: torch.Tensor, mask: torch.Tensor, return_mask: bool):
    """``torch.where(mask, x, 0)`` (pruned entries exactly 0), plus the mask if asked."""
    out = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return (out, mask) if return_mask else out
