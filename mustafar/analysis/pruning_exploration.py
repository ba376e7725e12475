"""Notebook 02 (``02_pruning_exploration``): attention-output error of every pruning strategy
against sparsity (K only, V only, joint) on captured Q/K/V, and what each strategy keeps.

Functions: :func:`supports` (which strategy can prune what), :func:`attention_probs`,
:func:`attention_output`, :func:`prune_kv`, :func:`output_error`, :func:`error_sweep`,
:func:`mask_examples`, :func:`kept_summary`. The capture is :mod:`mustafar.analysis.prompts`.

Shapes follow docs/design.md: ``B`` batch, ``H_kv`` KV heads, ``H_q`` query heads,
``G = H_q // H_kv``, ``T`` tokens, ``D`` head_dim.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "STRATEGY_TARGETS",
    "supports",
    "attention_probs",
    "attention_output",
    "prune_kv",
    "output_error",
    "error_sweep",
    "mask_examples",
    "kept_summary",
]


#: which tensors each strategy can prune (``"k"``, ``"v"``) and the sparsities it allows (None: any).
STRATEGY_TARGETS: dict[str, dict] = {
    "per_token_magnitude": {"targets": ("k", "v"), "sparsities": None},
    "per_channel_magnitude": {"targets": ("k", "v"), "sparsities": None},
    "output_aware": {"targets": ("k", "v"), "sparsities": None},
    "think": {"targets": ("k",), "sparsities": None},  # ThinK is a key-cache method
    "semi_structured_2_4": {"targets": ("k", "v"), "sparsities": (0.5,)},
}

_TARGETS = ("k", "v", "kv")


def supports(strategy: str, target: str, sparsity: float) -> bool:
    """Whether ``strategy`` can prune ``target`` (``"k"``, ``"v"``, ``"kv"``) at ``sparsity``."""
    if strategy not in STRATEGY_TARGETS:
        raise ValueError(f"unknown strategy {strategy!r}; known: {sorted(STRATEGY_TARGETS)}")
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    spec = STRATEGY_TARGETS[strategy]
    if spec["sparsities"] is not None and not any(abs(sparsity - s) < 1e-9 for s in spec["sparsities"]):
        return False
    return all(t in spec["targets"] for t in ("k", "v") if t in target)


def _gqa_expand(x: torch.Tensor, g: int) -> torch.Tensor:
    """``[B, H_kv, T, D]`` -> ``[B, H_kv*G, T, D]``: each KV head repeated for its ``G`` query heads."""
    return x if g == 1 else x.repeat_interleave(g, dim=1)  # [B, H_kv*G, T, D]


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention probabilities ``[B, H_q, T_q, T]`` (float32), query ``i`` at
    position ``T - T_q + i``; ``q [B, H_q, T_q, D]``, ``k [B, H_kv, T, D]``."""
    b, hq, tq, d = q.shape
    t = k.shape[2]
    kk = _gqa_expand(k.float(), hq // k.shape[1])  # [B, H_q, T, D]
    s = torch.einsum("bhqd,bhtd->bhqt", q.float(), kk) / math.sqrt(d)
    pos_q = torch.arange(t - tq, t)[:, None]
    s = s.masked_fill(torch.arange(t)[None, :] > pos_q, -math.inf)
    return torch.softmax(s, dim=-1)


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Causal attention output of the last ``n_queries`` queries over all ``T`` tokens.

    Parameters
    ----------
    q : ``[B, H_q, T, D]``; k, v : ``[B, H_kv, T, D]`` (GQA: query head ``h`` reads KV head ``h // G``).
    n_queries : int in ``[1, T]``.

    Returns
    -------
    float32 ``[B, H_q, n_queries, D]``.
    """
    t = k.shape[2]
    if not 1 <= n_queries <= t:
        raise ValueError(f"n_queries must be in [1, T={t}], got {n_queries!r}")
    p = attention_probs(q[:, :, t - n_queries:], k)  # [B, H_q, n, T]
    vv = _gqa_expand(v.float(), q.shape[1] // v.shape[1])  # [B, H_q, T, D]
    return torch.einsum("bhqt,bhtd->bhqd", p, vv)


def _prune_one(x, sparsity, strategy, kind, q, k_full, attn_cols, return_mask):
    """``mustafar.pruning.prune`` of ``x [B, H_kv, T_c, D]`` with what a query-driven strategy needs
    (``q [B, H_q, T, D]``; ``attn_cols [B, H_q, T, T_c]``, the attention the pruned tokens receive)."""
    from mustafar.pruning import prune

    kw = {}
    if strategy == "output_aware":
        kw = {"kind": "key", "q": q[:, :, : x.shape[2]]} if kind == "k" else {"kind": "value", "attn": attn_cols}
    elif strategy == "think":
        kw = {"q": q}
    return prune(x, sparsity, strategy, return_mask=return_mask, **kw)


def prune_kv(layer: dict, sparsity: float, strategy: str, target: str = "kv", window: int = 32,
             return_masks: bool = False):
    """Prune the K and/or V of one captured layer, keeping the most recent ``window`` tokens dense
    (the paper's local window).

    Query-driven strategies get what they need from the capture: ``output_aware`` keys use the
    queries at the pruned positions, its values the attention every token receives from all
    ``T`` queries; ``think`` uses the last 32 queries.

    Parameters
    ----------
    layer : ``{"q": [B, H_q, T, D], "k": [B, H_kv, T, D], "v": [B, H_kv, T, D]}``.
    sparsity : float in [0, 1).
    strategy : a key of ``mustafar.pruning.STRATEGIES``.
    target : ``"k"``, ``"v"`` or ``"kv"`` (both, same strategy and sparsity).
    window : int >= 0, most recent tokens kept dense.
    return_masks : also return ``{"k": mask or None, "v": ...}`` (bool ``[B, H_kv, T, D]``).

    Returns
    -------
    (k, v) or (k, v, masks).
    """
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    if not supports(strategy, target, sparsity):
        raise ValueError(f"strategy {strategy!r} cannot prune target {target!r} at sparsity {sparsity}")
    q, k, v = layer["q"], layer["k"], layer["v"]
    t = k.shape[2]
    if not isinstance(window, int) or not 0 <= window < t:
        raise ValueError(f"window must be an int in [0, T={t}), got {window!r}")
    tc = t - window  # tokens that get pruned: [0, tc)
    attn_cols = None
    if strategy == "output_aware" and "v" in target:
        attn_cols = attention_probs(q, k)[..., :tc]  # [B, H_q, T, tc]: attention received by pruned tokens
    out = {"k": k, "v": v}
    masks = {"k": None, "v": None}
    for kind in ("k", "v"):
        if kind not in target:
            continue
        x = out[kind]
        pruned, m = _prune_one(x[:, :, :tc], sparsity, strategy, kind, q, k, attn_cols, True)
        out[kind] = torch.cat([pruned, x[:, :, tc:]], dim=2)  # [B, H_kv, T, D]
        masks[kind] = torch.cat([m, torch.ones_like(x[:, :, tc:], dtype=torch.bool)], dim=2)
    return (out["k"], out["v"], masks) if return_masks else (out["k"], out["v"])


def output_error(layer: dict, sparsity: float, strategy: str, target: str = "kv", n_queries: int = 32,
                 window: int = 32) -> float:
    """Relative attention-output error ``||O_pruned - O_dense||_F / ||O_dense||_F`` of the last
    ``n_queries`` queries of one captured layer (see :func:`prune_kv` for the arguments)."""
    ref = attention_output(layer["q"], layer["k"], layer["v"], n_queries)
    k, v = prune_kv(layer, sparsity, strategy, target, window)
    out = attention_output(layer["q"], k, v, n_queries)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def error_sweep(qkv: dict, strategies: Sequence[str], sparsities: Sequence[float],
                targets: Sequence[str] = ("k", "v", "kv"), n_queries: int = 32, window: int = 32,
                progress: bool = True):
    """Attention-output error for every (layer, strategy, target, sparsity) a strategy supports.

    Parameters
    ----------
    qkv : dict
        ``{layer: {"q": [B, H_q, T, D], "k": [B, H_kv, T, D], "v": [B, H_kv, T, D]}}``.
    strategies, sparsities, targets : sequences
        The grid (targets among ``"k"``, ``"v"``, ``"kv"``).
    n_queries, window : int
        See :func:`output_error`.
    progress : bool
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        Columns ``layer, strategy, target, sparsity, rel_error``; unsupported combinations (ThinK
        on values, 2:4 away from 0.5) are left out.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    jobs = [(li, st, tg, s) for li in sorted(qkv) for st in strategies for tg in targets for s in sparsities
            if supports(st, tg, s)]
    rows = []
    for li, st, tg, s in tqdm(jobs, desc="error sweep", disable=not progress):
        rows.append({"layer": li, "strategy": st, "target": tg, "sparsity": float(s),
                     "rel_error": output_error(qkv[li], s, st, tg, n_queries, window)})
    return pd.DataFrame(rows)


def mask_examples(layer: dict, sparsity: float, strategies: Sequence[str], kind: str = "k", head: int = 0,
                  tokens: int = 64, window: int = 32) -> dict:
    """Keep-masks of one head for each strategy.

    The first ``tokens`` positions of the prompt are shown (all of them pruned when the prompt is
    longer than ``tokens + window``). A strategy with fixed sparsities (``semi_structured_2_4``:
    0.5, :data:`STRATEGY_TARGETS`) is shown at its own.

    Parameters
    ----------
    layer : dict
        ``{"q": [B, H_q, T, D], "k": [B, H_kv, T, D], "v": [B, H_kv, T, D]}``.
    sparsity : float
        Sparsity of the strategies that take any.
    strategies : sequence of str
        Keys of ``mustafar.pruning.STRATEGIES``; those that cannot prune ``kind`` are left out.
    kind : {"k", "v"}
    head : int
        KV head shown (of batch row 0).
    tokens, window : int
        Positions shown; most recent tokens kept dense (see :func:`prune_kv`).

    Returns
    -------
    dict
        ``{"<strategy> (<sparsity>%)": bool ndarray [tokens, D]}``.
    """
    out = {}
    for st in strategies:
        fixed = STRATEGY_TARGETS.get(st, {}).get("sparsities")
        s = fixed[0] if fixed else sparsity  # a fixed-sparsity pattern (2:4) is shown at its own sparsity
        if not supports(st, kind, s):
            continue
        _, _, masks = prune_kv(layer, s, st, kind, window, return_masks=True)
        out[f"{st} ({s:.0%})"] = masks[kind][0, head, :tokens].numpy()
    return out


def kept_summary(masks: dict):
    """How much each keep-mask keeps: ``{label: bool [T, D]}`` -> DataFrame with ``kept_fraction``,
    ``min_kept_per_token``, ``max_kept_per_token`` and ``same_count_every_token`` (the property the
    fixed-stride bitmap format needs: true for per-token top-k, 2:4 and ThinK, not per-channel)."""
    import numpy as np
    import pandas as pd

    rows = []
    for label, m in masks.items():
        per_row = np.asarray(m, dtype=bool).sum(-1)  # [T]
        rows.append({"mask": label, "kept_fraction": round(float(np.mean(m)), 3),
                     "min_kept_per_token": int(per_row.min()), "max_kept_per_token": int(per_row.max()),
                     "same_count_every_token": bool(per_row.min() == per_row.max())})
    return pd.DataFrame(rows).set_index("mask")

