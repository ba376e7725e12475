"""ThinK-style structured channel pruning (arXiv 2407.21018): query-driven, whole channels per head."""

from __future__ import annotations

import torch

from ._common import apply_mask, check_input
from .select import select
from .output_aware import check_queries


def think_channel_scores(x: torch.Tensor, q: torch.Tensor, obs_window: int = 32) -> torch.Tensor:
    """Channel scores ``[B, H_kv, D]``.

    ``score[b, h, c] = || Q_obs[b, group(h), :, c] K[b, h, :, c]^T ||_F
    = ||Q_obs[b, group(h), :, c]||_2 * ||K[b, h, :, c]||_2``, with ``Q_obs`` the last ``obs_window``
    queries of the ``G`` query heads sharing KV head ``h`` (fewer when ``T_q < obs_window``).
    """
    if isinstance(obs_window, bool) or not isinstance(obs_window, int) or obs_window < 1:
        raise ValueError(f"obs_window must be a positive int, got {obs_window!r}")
    check_queries(q, x, same_length=False)
    B, H, T, D = x.shape
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    qo = q[:, :, -obs_window:].to(dt)  # [B, H_q, T_obs, D]
    qn = qo.pow(2).reshape(B, H, -1, D).sum(2).sqrt()  # [B, H_kv, D]
    kn = x.to(dt).pow(2).sum(2).sqrt()  # [B, H_kv, D]
    return qn * kn


def think(
    x: torch.Tensor,
    sparsity: float,
    *,
    q: torch.Tensor | None = None,
    obs_window: int = 32,
    kind: str = "key",
    return_mask: bool = False,
):
    """Prune ``floor(sparsity*D + 0.5)`` whole channels per (sequence, KV head), ThinK style.

    The same channels are zeroed for every token of a head. ThinK is a key-cache method: only
    ``kind="key"`` is accepted (``"value"`` raises ``ValueError``).

    Parameters
    ----------
    x : Tensor ``[B, H_kv, T, D]``, floating keys (post-RoPE, as cached).
    sparsity : float in [0, 1).
    q : Tensor ``[B, H_q, T_q, D]`` post-RoPE queries (required); the last ``obs_window`` are used.
    obs_window : int, observation window of queries (default 32).
    kind : ``"key"`` only.
    return_mask : bool, also return the bool keep-mask ``[B, H_kv, T, D]``.

    Returns
    -------
    Tensor ``[B, H_kv, T, D]`` of ``x.dtype`` (and the mask). Ties between channel scores: lower
    channel pruned first.
    """
    s = check_input(x, sparsity)
    if kind != "key":
        raise ValueError(f"think prunes key channels only (query-driven); got kind={kind!r}")
    B, H, T, D = x.shape
    score = think_channel_scores(x, q, obs_window)  # [B, H_kv, D]
    mask = select(score, s, "head_channels", tokens=T).contiguous()  # [B, H_kv, T, D]
    return apply_mask(x, mask, return_mask)
