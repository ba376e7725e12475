"""Notebook 05, wall-clock part: the files of ``python -m mustafar.bench wallclock`` read into tables.

``results/e2e_wallclock_<gpu>.json`` (GPU, when recorded; ``e2e_wallclock_budget_<gpu>.json``: the largest batch of
each cache kind under a KV budget, ``--budget-batches``) and ``results/generate_compile_cpu.json`` (CPU) hold one cell per (model, dtype, device, batch, prompt:new); each cell holds one entry per variant
(``dynamic``, ``static-compiled``, ``hf-static-compiled``, ``mustafar@0.7``, ``mustafar-compiled@0.7``, ...)
with medians of wall-clock seconds and the ratios against the compiled StaticCache variants measured in
the same cell (:mod:`mustafar.bench.wallclock` says how). These functions only reshape; they compute no
new ratio: "best compiled StaticCache" is the file's own choice per cell (``best_static_compiled``: the
faster whole call).
"""

from __future__ import annotations

__all__ = ["wallclock_table", "wallclock_headline", "budget_headline"]

_COLUMNS = ["model", "dtype", "device", "batch", "P:N", "best_static", "variant", "label", "sparsity", "decode_tok_per_s",
            "total_s", "prefill_s", "first_call_s", "decode_vs_best_static", "total_vs_best_static",
            "tokens_equal_dynamic", "cache_gib"]


def wallclock_table(raw: dict):
    """One row per (cell, variant) that ran; variants that could not run (an ``error`` entry) are left out
    and listed in ``df.attrs["not_run"]`` as ``(cell, label, message)``. ``decode_vs_best_static`` /
    ``total_vs_best_static``: the variant's decode tokens/s / total time against the faster compiled
    StaticCache of its cell (> 1 = faster than it), as recorded in the file."""
    import pandas as pd

    rows, not_run = [], []
    for cell in raw.get("cells", []):
        key = dict(model=cell["model"], dtype=cell["dtype"], device=cell["device"], batch=cell["batch"],
                   **{"P:N": f"{cell['prompt']}:{cell['new_tokens']}"}, best_static=cell.get("best_static_compiled"))
        for label, v in cell["variants"].items():
            if "error" in v:
                not_run.append((key, label, v["error"]))
                continue
            best = v.get("vs_best_static_compiled") or {}
            rows.append(dict(key, variant=v["variant"], label=label, sparsity=v.get("sparsity"),
                             decode_tok_per_s=v["decode_tok_per_s"], total_s=v["total_s"],
                             prefill_s=v["prefill_s"], first_call_s=v.get("first_call_s"),
                             decode_vs_best_static=best.get("decode_tok_per_s"),
                             total_vs_best_static=best.get("total"),
                             tokens_equal_dynamic=v.get("tokens_equal_dynamic"), cache_gib=v.get("cache_gib")))
    df = pd.DataFrame(rows, columns=_COLUMNS)
    df.attrs["not_run"] = not_run
    return df


def wallclock_headline(df):
    """Per cell: its best compiled StaticCache and each MustafarCache entry's recorded ratios to it
    (``decode_ratio``: decode tokens/s, ``total_ratio``: whole-call time; > 1 = faster), the table the
    README's headline is taken from. Empty when the file holds no MustafarCache entry or no baseline."""
    import pandas as pd

    keys = ["model", "dtype", "device", "batch", "P:N"]
    out = []
    for k, sub in df.groupby(keys, sort=False):
        base = sub[sub["label"] == sub["best_static"].iloc[0]]
        if base.empty:
            continue
        for _, r in sub[sub["variant"].str.startswith("mustafar")].iterrows():
            out.append(dict(zip(keys, k), baseline=base["label"].iloc[0],
                            baseline_tok_per_s=base["decode_tok_per_s"].iloc[0], cache=r["label"],
                            tok_per_s=r["decode_tok_per_s"], decode_ratio=r["decode_vs_best_static"],
                            total_ratio=r["total_vs_best_static"]))
    return pd.DataFrame(out)


def budget_headline(raw: dict):
    """The file's ``best_under_budget`` entries (``--budget-batches``) as a table: per model, dtype, P:N and
    MustafarCache variant, the best compiled StaticCache under the budget (its batch and decode tokens/s), the
    variant's best (batch, tokens/s) and their ratio as recorded. Empty when the file has none."""
    import pandas as pd

    out = []
    for e in raw.get("best_under_budget", []):
        ref = e.get("best_static_compiled") or {}
        for label, r in e.get("mustafar", {}).items():
            out.append({"model": e["model"], "dtype": e["dtype"], "P:N": f"{e['prompt']}:{e['new_tokens']}",
                        "budget_gib": e["kv_budget_gib"], "static_batch": ref.get("batch"),
                        "static_tok_per_s": ref.get("decode_tok_per_s"), "cache": label, "batch": r["batch"],
                        "tok_per_s": r["decode_tok_per_s"], "decode_ratio": r.get("vs_best_static_compiled")})
    return pd.DataFrame(out)
