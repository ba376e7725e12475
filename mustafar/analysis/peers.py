"""Notebook 04, the peers part: MUSTAFAR against kvpress presses, quantized caches and the paper's
joint experiments at equal KV bytes, read from ``results/peers_<model>.json`` (written by
``make peers``, :mod:`mustafar.eval.peers`; kvpress needs its own environment, so the notebook
only reads the committed results).

Functions: :func:`peers_results`, :func:`peers_summary`, :func:`method_group`, :func:`bytes_table`,
:func:`best_at_levels`, :func:`plot_peers_pareto`, :func:`markdown_table` (the README's table).

Reading the numbers: ``avg`` is the mean score (%) over the method's (task, length) cells, ``n`` the
samples behind it (pooled over cells) and ``ci95_lo``/``ci95_hi`` a Wilson 95 % interval with
``p = avg`` and ``n`` (:func:`mustafar.eval.peers.wilson`); ``bytes_ratio`` the fp16 bytes per
context token of the compressed layers relative to dense (:mod:`mustafar.eval.peers.accounting`).
"""

from __future__ import annotations

from typing import Sequence

from mustafar.analysis.results import read_results_json

__all__ = ["peers_results", "peers_summary", "method_group", "bytes_table", "best_at_levels",
           "plot_peers_pareto", "markdown_table", "LEVELS"]

#: the byte levels of the table (fractions of dense fp16 bytes): MUSTAFAR's 50 % and 70 % formats
#: (D = 64: 0.5625 and 0.359) and 0.2.
LEVELS = (0.5625, 0.36, 0.2)

#: colour per method group in the Pareto plot (the same in every figure).
GROUP_COLORS = {
    "MUSTAFAR": "#1f77b4", "MUSTAFAR+KIVI": "#17becf", "H2O+MUSTAFAR": "#9edae5",
    "SnapKV": "#ff7f0e", "ExpectedAttention": "#2ca02c", "KNorm": "#d62728", "StreamingLLM": "#9467bd",
    "TOVA": "#8c564b", "ObservedAttention (H2O)": "#e377c2",
    "quanto": "#7f7f7f", "HQQ": "#bcbd22", "FP8 (per token)": "#393b79", "QuantizedCache fp8": "#637939",
    "dense": "#000000",
}
_MARKERS = {"mustafar": "o", "joint": "D", "kvpress": "s", "quant": "^", "dense": "*"}


def peers_results(model: str = "smollm2-135m") -> dict:
    """The committed ``results/peers_<model>.json`` (raises ``FileNotFoundError`` without it)."""
    return read_results_json(f"peers_{model.replace('/', '_')}")


def _profile_settings(results: dict, profile: str) -> dict:
    from mustafar.eval.peers import PROFILES

    prof = (results.get("profiles") or {}).get(profile) or PROFILES.get(profile)
    if prof is None:
        raise ValueError(f"profile {profile!r} is neither in the results ({list(results.get('profiles', {}))}) "
                         f"nor in mustafar.eval.peers.PROFILES")
    return prof


def _in_profile(cell: dict, prof: dict) -> bool:
    L = cell.get("context_length")
    return (cell.get("task") in tuple(prof["tasks"]) and L in tuple(prof["lengths"])
            and cell.get("n_samples") == prof["samples"]
            and (not cell.get("qic") or L in tuple(prof.get("qic_lengths", prof["lengths"]))))


def method_group(row) -> str:
    """The method a point belongs to, across its compression levels (one line in the Pareto plot)."""
    fam, m = row["family"], row["method"]
    if fam == "dense":
        return "dense"
    if fam == "mustafar":
        return "MUSTAFAR"
    if fam == "kvpress":
        return "ObservedAttention (H2O)" if m == "ObservedAttention" else m
    if fam == "quant":
        return {"quanto": "quanto", "hqq": "HQQ", "fp8": "FP8 (per token)", "qc-fp8": "QuantizedCache fp8"}.get(m, m)
    return {"tok+kivi": "MUSTAFAR+KIVI", "tok+fp8": "MUSTAFAR+FP8"}.get(m, "H2O+MUSTAFAR")


def peers_summary(results: dict, profile: str = "full", variant: str | None = "std"):
    """One row per method over the cells of ``profile`` (the results file's own settings of it, else
    ``mustafar.eval.peers.PROFILES``): :func:`mustafar.eval.peers.summarize` plus ``group`` and a
    short ``label``; ``variant`` ``"std"`` (kvpress's pipeline), ``"qic"`` or ``None`` (both).

    Only the (task, length) cells that every method of a variant has are used (``attrs["cells"]``;
    the others are listed in ``attrs["dropped_cells"]``), so every row averages the same samples."""
    from mustafar.eval.peers import summarize

    prof = _profile_settings(results, profile)
    cells = [c for c in results.get("cells", []) if _in_profile(c, prof)
             and (variant is None or c.get("variant") == variant)]
    # compare methods on the same cells only: keep the (variant, task, length) cells every method of
    # the variant has (a run cut short leaves some methods with fewer cells)
    by_var: dict = {}
    for c in cells:
        by_var.setdefault(c["variant"], {}).setdefault(c["name"], set()).add((c["task"], c["context_length"]))
    common = {v: set.intersection(*m.values()) for v, m in by_var.items()}
    dropped = sorted({(c["variant"], c["task"], c["context_length"]) for c in cells
                      if (c["task"], c["context_length"]) not in common[c["variant"]]})
    cells = [c for c in cells if (c["task"], c["context_length"]) in common[c["variant"]]]
    df = summarize(cells, variant=variant)
    if df.empty:
        return df
    df = df.copy()
    df.attrs["dropped_cells"] = dropped
    df.attrs["cells"] = sorted({(c["variant"], c["task"], c["context_length"]) for c in cells})
    df["group"] = df.apply(method_group, axis=1)
    df["label"] = df["name"].str.replace(r"\[(std|qic)\]$", "", regex=True)
    return df.reset_index(drop=True)


def _fmt(row) -> str:
    return f"{row['avg']:.1f} [{row['ci95_lo']:.0f}-{row['ci95_hi']:.0f}] n={int(row['n'])} @{row['bytes_ratio']:.2f}"


def bytes_table(summary, levels: Sequence[float] = LEVELS, rel_tol: float = 0.25):
    """Score of every method near each byte level: one row per method group, one column per level
    (``~0.56`` ...): ``avg [CI] n=.. @bytes`` of the group's point whose ``bytes_ratio`` is closest to
    the level, if within ``rel_tol`` of it (else empty). Dense is listed at ``@1.00`` in every column.

    Returns
    -------
    pandas.DataFrame
        Indexed by group; ordered by the mean score over the levels (best first).
    """
    import pandas as pd

    cols = {f"~{lv:.2f}".rstrip("0").rstrip(".") if lv != 0.5625 else "~0.56": lv for lv in levels}
    rows, order = {}, {}
    for group, sub in summary.groupby("group"):
        out, scores = {}, []
        for col, lv in cols.items():
            if group == "dense":
                r = sub.iloc[0]
            else:
                d = (sub["bytes_ratio"] - lv).abs()
                if d.min() > rel_tol * lv:
                    out[col] = ""
                    continue
                r = sub.loc[d.idxmin()]
            out[col] = _fmt(r)
            scores.append(float(r["avg"]))
        rows[group] = out
        order[group] = sum(scores) / len(scores) if scores else -1.0
    df = pd.DataFrame.from_dict(rows, orient="index")
    return df.loc[sorted(rows, key=lambda g: -order[g])]


def best_at_levels(summary, levels: Sequence[float] = LEVELS, rel_tol: float = 0.25):
    """Per byte level: the best method (highest ``avg``) within ``rel_tol``, MUSTAFAR's point there and
    its rank among the methods at that level (the README's where-it-wins / where-it-loses sentences)."""
    import pandas as pd

    rows = []
    pts = summary[summary["group"] != "dense"]
    for lv in levels:
        near = pts[(pts["bytes_ratio"] - lv).abs() <= rel_tol * lv]
        near = near.loc[near.groupby("group")["bytes_ratio"].apply(lambda s: (s - lv).abs().idxmin())]
        near = near.sort_values("avg", ascending=False)
        best = near.iloc[0] if len(near) else None
        mus = near[near["group"] == "MUSTAFAR"]
        rows.append(dict(level=lv, n_methods=len(near),
                         best=None if best is None else best["label"],
                         best_avg=None if best is None else best["avg"],
                         best_ci=None if best is None else f"{best['ci95_lo']:.0f}-{best['ci95_hi']:.0f}",
                         mustafar=None if mus.empty else mus.iloc[0]["label"],
                         mustafar_avg=None if mus.empty else mus.iloc[0]["avg"],
                         mustafar_ci=None if mus.empty else f"{mus.iloc[0]['ci95_lo']:.0f}-{mus.iloc[0]['ci95_hi']:.0f}",
                         mustafar_rank=None if mus.empty else int((near["avg"] > mus.iloc[0]["avg"]).sum()) + 1))
    return pd.DataFrame(rows)


def plot_peers_pareto(ax, summary, title: str = "", xlabel: str = "KV bytes / dense fp16 bytes",
                      errorbars: bool = True, legend: bool = True):
    """Average score against KV bytes, every method: one colour per method group with its points
    joined across compression levels, Wilson 95 % intervals as error bars, dense as a dashed line,
    MUSTAFAR drawn on top, and the Pareto front (fewer bytes, higher score) in black; the legend
    (``legend=True``) outside the axes, on the right."""
    from mustafar.analysis.plotting import pareto_front

    dense = summary[summary["group"] == "dense"]
    if not dense.empty:
        ax.axhline(float(dense["avg"].iloc[0]), color="k", ls="--", lw=1,
                   label=f"dense ({dense['avg'].iloc[0]:.0f}, n={int(dense['n'].iloc[0])})")
    pts = summary[summary["group"] != "dense"]
    for group, sub in sorted(pts.groupby("group"), key=lambda kv: kv[0] == "MUSTAFAR"):
        sub = sub.sort_values("bytes_ratio")
        fam = sub["family"].iloc[0]
        color = GROUP_COLORS.get(group, None)
        mus = group == "MUSTAFAR"
        if errorbars:
            ax.errorbar(sub["bytes_ratio"], sub["avg"], yerr=[sub["avg"] - sub["ci95_lo"], sub["ci95_hi"] - sub["avg"]],
                        fmt="none", ecolor=color, alpha=0.25, lw=1, capsize=0)
        ax.plot(sub["bytes_ratio"], sub["avg"], marker=_MARKERS.get(fam, "o"), color=color, label=group,
                lw=2.2 if mus else 1.0, ms=8 if mus else 5, zorder=5 if mus else 3, alpha=1.0 if mus else 0.85)
    if len(pts):
        idx = pareto_front(pts["bytes_ratio"], pts["avg"])
        ax.plot(pts["bytes_ratio"].to_numpy()[idx], pts["avg"].to_numpy()[idx], color="k", lw=0.8, ls=":",
                label="Pareto front", zorder=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean score (%)")
    ax.set_xlim(0, 1.05)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return ax


def markdown_table(df, index_name: str = "method") -> str:
    """``df`` (e.g. :func:`bytes_table`) as a GitHub markdown table, the index as the first column
    (the README's table is printed by the notebook with this)."""
    cols = [index_name] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        cells = [str(idx)] + ["" if v is None or v != v else str(v) for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
