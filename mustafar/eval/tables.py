"""Tables of a sweep's results: per-cell summary and the accuracy-vs-bytes Pareto front.

Reads what :mod:`mustafar.eval.sweep` writes (cells carry every parameter; a profile selects cells by
its settings).
"""

from __future__ import annotations

import math

from .runtime import CacheSpec
from .sweep import _SCALAR_COLS, _SPEC_FIELDS, PROFILES

__all__ = ["summarize", "pareto"]


# ------------------------------------------------------------------------------------- tables
def _in_profile(cell: dict, prof: dict) -> bool:
    """Whether a cell was produced with the settings of profile ``prof`` (cells carry no profile tag)."""
    suite = cell.get("suite")
    if suite == "ruler":
        return (cell.get("n_samples") == prof["ruler_samples"] and cell.get("context_length") in tuple(prof["ruler_lengths"])
                and cell.get("task") in tuple(prof["ruler_tasks"]))
    if suite == "ppl":
        pp = prof["ppl"]
        return (cell.get("context_length") == pp["prefill_tokens"] and cell.get("eval_tokens") == pp["eval_tokens"]
                and cell.get("n_segments") == pp["n_segments"])
    if suite == "longbench":
        return cell.get("context_length") == prof["longbench_max_length"]
    return True


def _frame(results, profile: str | None = None):
    import pandas as pd

    cells = results["cells"] if isinstance(results, dict) else results
    if profile is None and isinstance(results, dict):
        profile = (results.get("last_run") or {}).get("profile")
    if profile is not None and isinstance(results, dict):
        prof = (results.get("profiles") or {}).get(profile) or PROFILES.get(profile)
        if prof is None:
            raise ValueError(f"profile {profile!r} not in the results ({list(results.get('profiles', {}))})")
        cells = [c for c in cells if _in_profile(c, prof)]
    df = pd.DataFrame([{c: cell.get(c) for c in _SCALAR_COLS} for cell in cells], columns=list(_SCALAR_COLS))
    if not df.empty:  # config names from the spec fields (robust to naming changes between runs)
        df["config"] = [CacheSpec(**{f: cell.get(f) for f in _SPEC_FIELDS}).name for cell in cells]
    return df


def summarize(results, model: str | None = None, profile: str | None = None):
    """Paper-style table: one row per (group, config), one column per task (score, %), ``avg``, ``ppl``.

    ``profile`` keeps the cells made with that profile's settings (default: the last run's profile),
    so quick and full cells can share one file. ``avg`` is the mean over the score columns (RULER tasks x lengths, LongBench datasets); ``ppl``
    is the prose perplexity (lower is better, not in ``avg``). Rows are ordered dense, K-only,
    V-only, joint, asymmetric, by strategy and sparsity.

    Returns
    -------
    pandas.DataFrame indexed by (group, config), plus columns ``mode`` and ``bytes_ratio``.
    """
    import pandas as pd

    df = _frame(results, profile)
    if df.empty:
        return pd.DataFrame()
    if model is not None:
        df = df[df.model == model]
    df = df.copy()
    df["column"] = df.apply(lambda r: (f"{r.task}@{int(r.context_length) // 1024}K" if r.suite == "ruler"
                                       else r.task), axis=1)
    scored = df[df.suite != "ppl"]
    table = scored.pivot_table(index=["group", "config"], columns="column", values="score", aggfunc="mean")
    table["avg"] = table.mean(axis=1)
    ppl = df[df.suite == "ppl"].groupby(["group", "config"])["ppl"].mean()
    table = table.join(ppl, how="outer") if not ppl.empty else table
    meta = df.groupby(["group", "config"]).agg(mode=("mode", "first"), bytes_ratio=("bytes_ratio", "first"),
                                                k_sparsity=("k_sparsity", "first"), v_sparsity=("v_sparsity", "first"),
                                                strategy=("k_strategy", "first"))
    table = table.join(meta)
    order = {"dense": 0, "K-only": 1, "V-only": 2, "joint": 3, "asymmetric": 4}
    table = table.reset_index()
    table["_o"] = table["group"].map(order)
    table = table.sort_values(["_o", "strategy", "k_sparsity", "v_sparsity", "config"]).drop(columns=["_o", "strategy", "k_sparsity", "v_sparsity"])
    return table.set_index(["group", "config"]).round(2)


def pareto(results, keep: float = 0.95, model: str | None = None, profile: str | None = None):
    """Accuracy vs cache bytes.

    Returns
    -------
    pandas.DataFrame with one row per config: ``bytes_ratio`` (fp16 format bytes vs dense), ``avg``
    (mean score), ``rel`` (avg / dense avg), ``pareto`` (True on the accuracy-vs-bytes frontier),
    sorted by bytes. ``df.attrs["smallest_keeping"]`` names the config with the smallest
    ``bytes_ratio`` whose ``avg >= keep * dense avg`` (and ``df.attrs["keep"]``).
    """
    t = summarize(results, model, profile).reset_index()
    if t.empty or "avg" not in t:
        return t
    dense = t.loc[t.group == "dense", "avg"]
    base = float(dense.iloc[0]) if len(dense) else float("nan")
    out = t[["group", "config", "mode", "bytes_ratio", "avg"]].copy()
    out["rel"] = out["avg"] / base if base else float("nan")
    out = out.sort_values(["bytes_ratio", "avg"], ascending=[True, False]).reset_index(drop=True)
    # frontier: no other config has <= bytes and >= avg with one of them strict
    flags = []
    for _, r in out.iterrows():
        dominated = ((out["bytes_ratio"] <= r.bytes_ratio) & (out["avg"] >= r.avg)
                     & ((out["bytes_ratio"] < r.bytes_ratio) | (out["avg"] > r.avg))).any()
        flags.append(not dominated)
    out["pareto"] = flags
    ok = out[out["avg"] >= keep * base]
    out.attrs["keep"] = keep
    out.attrs["dense_avg"] = base
    out.attrs["smallest_keeping"] = (None if ok.empty else
                                     dict(ok.sort_values(["bytes_ratio", "avg"], ascending=[True, False]).iloc[0]))
    return out
