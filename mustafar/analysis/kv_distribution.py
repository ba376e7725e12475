"""Notebook 01 (``01_kv_distribution``): per-channel magnitudes of the captured keys and values
(the paper's Figure 2: a few outlier key channels, flat values).

The Q/K/V capture itself is :mod:`mustafar.analysis.prompts`. Shapes follow docs/design.md:
``B`` batch, ``H_kv`` KV heads, ``T`` tokens, ``D`` head_dim.
"""

from __future__ import annotations

import math

import torch

__all__ = ["channel_magnitudes", "channel_stats", "layer_summary"]


def channel_magnitudes(x: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """Per-channel magnitude of a K or V tensor.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, H, T, D]``.
    reduce : {"max", "mean"}
        ``"max"``: max |x| over batch and tokens; ``"mean"``: mean |x|.

    Returns
    -------
    torch.Tensor
        float32 ``[H, D]``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a [B, H, T, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    a = x.detach().float().abs().transpose(0, 1).flatten(1, 2)  # [H, B*T, D]
    if reduce == "max":
        return a.amax(dim=1)
    if reduce == "mean":
        return a.mean(dim=1)
    raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")


def channel_stats(qkv: dict, reduce: str = "max"):
    """Per layer, head and tensor (K, V): the largest and the median channel magnitude.

    ``ratio = max_channel / median_channel``: large for keys with outlier channels, near 1-2 for the
    flat values (the paper's Figure 2 observation).

    Parameters
    ----------
    qkv : dict
        ``{layer: {"k": [B, H_kv, T, D], "v": ...}}`` (from
        :func:`mustafar.analysis.prompts.capture_prompt`).
    reduce : str
        How magnitudes are reduced over tokens, see :func:`channel_magnitudes`.

    Returns
    -------
    pandas.DataFrame
        Columns ``layer, tensor, head, max_channel, argmax_channel, median_channel, ratio``;
        ``head == "all"`` rows pool the channels of every head of the layer.
    """
    import pandas as pd

    rows = []
    for li in sorted(qkv):
        for name, key in (("K", "k"), ("V", "v")):
            m = channel_magnitudes(qkv[li][key], reduce)  # [H_kv, D]
            for h in range(m.shape[0]):
                rows.append(_stat_row(li, name, h, m[h]))
            rows.append(_stat_row(li, name, "all", m.flatten()))
    return pd.DataFrame(rows)


def _stat_row(layer, tensor, head, m: torch.Tensor) -> dict:
    """One row of :func:`channel_stats` from the channel magnitudes ``m [D]`` (or ``[H*D]``)."""
    mx, med = float(m.max()), float(m.median())
    return {
        "layer": layer,
        "tensor": tensor,
        "head": head,
        "max_channel": mx,
        "argmax_channel": int(m.argmax()),
        "median_channel": med,
        "ratio": mx / med if med > 0 else math.inf,
    }


def layer_summary(stats):
    """One row per layer from :func:`channel_stats`: max / median channel and their ratio for K and V
    (channels of all heads pooled).

    Parameters
    ----------
    stats : pandas.DataFrame
        The table of :func:`channel_stats`.

    Returns
    -------
    pandas.DataFrame
        Indexed by layer; columns ``K_max, K_median, K_ratio, V_max, V_median, V_ratio``.
    """
    pooled = stats[stats["head"].astype(str) == "all"]
    wide = pooled.pivot(index="layer", columns="tensor", values=["max_channel", "median_channel", "ratio"])
    wide.columns = [f"{t}_{c.replace('_channel', '')}" for c, t in wide.columns]
    order = ["K_max", "K_median", "K_ratio", "V_max", "V_median", "V_ratio"]
    return wide[[c for c in order if c in wide.columns]]
