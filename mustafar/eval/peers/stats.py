"""Uncertainty and the per-method summary of a peers results file.

Per cell: ``n`` samples and a Wilson 95 % interval with ``p`` = mean per-sample score (a sample's
answers are not independent draws, so they do not count as trials). Per method (:func:`summarize`):
the same over every sample of every (task, length) cell it has.
"""
from __future__ import annotations

import math

__all__ = ["wilson", "summarize"]


def wilson(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion ``p`` in [0, 1] from ``n`` trials (95 % by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = min(1.0, max(0.0, float(p)))
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(results, variant: str | None = None):
    """One row per method: average score over its (task, length) cells (``avg``, %), pooled ``n``,
    Wilson 95 % CI over all its samples (``ci95_lo``/``ci95_hi``, %), the byte ratios, one score column
    per ``task@length``; sorted by variant, family and bytes."""
    import pandas as pd

    cells = results["cells"] if isinstance(results, dict) else results
    by: dict = {}
    for c in cells:
        by.setdefault(c["name"], []).append(c)
    rows = []
    for name, cs in by.items():
        scores = [x for c in cs for x in c["sample_scores"]]
        p = sum(scores) / len(scores)
        lo, hi = wilson(p, len(scores))
        c0 = cs[0]
        br_cache = _mean([c.get("bytes_ratio_cache", c["bytes_ratio"]) for c in cs])
        ends = [c.get("bytes_ratio_end") for c in cs]
        rows.append(dict(name=name, family=c0["family"], method=c0["method"], variant=c0["variant"],
                         ratio=c0["ratio"], sparsity=c0["sparsity"], nbits=c0["nbits"],
                         bytes_ratio=round(_mean([c["bytes_ratio"] for c in cs]), 4),
                         bytes_ratio_cache=round(br_cache, 4),
                         bytes_ratio_end=round(_mean(ends), 4) if all(e is not None for e in ends) else None,
                         avg=round(sum(c["score"] for c in cs) / len(cs), 2), n=len(scores),
                         ci95_lo=round(100 * lo, 1), ci95_hi=round(100 * hi, 1), cells=len(cs),
                         **{f"{c['task']}@{c['context_length']}": c["score"] for c in cs}))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    if variant is not None:
        df = df[df.variant == variant]
    return df.sort_values(["variant", "family", "bytes_ratio", "name"],
                          ascending=[True, True, False, True]).reset_index(drop=True)
