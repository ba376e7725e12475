"""Notebook 05 (``05_throughput_and_memory``), recorded part: the GPU end-to-end results read into
tables.

The grid (``results/e2e_grid_h200.json`` from ``python -m mustafar.bench.e2e --grid --longest``,
``results/e2e_grid_static_h200.json``, ``results/e2e_checks_h200.json``): :data:`E2E_CACHE_ORDER`,
:func:`e2e_cache_label`, :func:`e2e_best_table`, :func:`e2e_targets`, :func:`e2e_tokens_vs_batch`,
:func:`e2e_longest_table`, :func:`e2e_linearity_table`, :func:`e2e_fit_residuals`,
:func:`e2e_cycle_table`, :func:`e2e_token_checks`.

Earlier runs the notebook shows as history (``results/archive/``, found with
:func:`mustafar.analysis.results.archive_path`): :func:`e2e_generate_table`, :func:`e2e_step_table`.

Files are read with :mod:`mustafar.analysis.results`; the live CPU measurements are
:mod:`mustafar.analysis.throughput`.
"""

from __future__ import annotations

import math

__all__ = [
    "E2E_CACHE_ORDER",
    "e2e_cache_label",
    "e2e_best_table",
    "e2e_targets",
    "e2e_tokens_vs_batch",
    "e2e_longest_table",
    "e2e_linearity_table",
    "e2e_fit_residuals",
    "e2e_cycle_table",
    "e2e_token_checks",
    "e2e_generate_table",
    "e2e_step_table",
]

#: the compression chunk of a grid file that does not record one (``MustafarConfig``'s default).
_DEFAULT_COMPRESS_CHUNK = 256

# --------------------------------------------------------------------------------------------------
# recorded e2e grid (results/e2e_grid_h200.json: python -m mustafar.bench.e2e --grid --longest)
# --------------------------------------------------------------------------------------------------

#: display order of the caches of the e2e grid (labels from :func:`e2e_cache_label`); also the
#: colour order of the notebook's figures (``plotting.plot_lines(..., order=E2E_CACHE_ORDER)`` gives a
#: cache the same colour in every panel and figure, StaticCache last so that figures without it agree).
E2E_CACHE_ORDER = ("dense DynamicCache", "mustafar 50%", "mustafar 70%", "dense StaticCache")


def e2e_cache_label(cache: str, sparsity: float | None = None) -> str:
    """Display name of an e2e cache kind: ``dense`` -> ``dense DynamicCache``, ``static`` ->
    ``dense StaticCache``, ``compressed`` at sparsity ``s`` -> ``mustafar 70%``."""
    if cache == "dense":
        return "dense DynamicCache"
    if cache == "static":
        return "dense StaticCache"
    if cache in ("compressed", "mustafar"):
        if sparsity is None:
            raise ValueError("a compressed cache needs its sparsity")
        return f"mustafar {float(sparsity):.0%}"
    raise ValueError(f"unknown e2e cache kind {cache!r}")


def _e2e_order(raw: dict, models=None) -> tuple[list, list]:
    """Models and ``(P, G)`` pairs in the order of the file's settings (then any others, sorted)."""
    settings = raw.get("settings") or {}
    rows = list(raw.get("derived") or []) + list(raw.get("best") or [])
    models_seen = list(dict.fromkeys(r["model"] for r in rows))
    models = list(dict.fromkeys([*(settings.get("models") or []), *models_seen])) if models is None else list(models)
    models = [m for m in models if m in models_seen]
    pairs = []
    for txt in settings.get("ratios") or []:
        p, g = (int(x) for x in str(txt).split(":"))
        pairs.append((p, g))
    for r in rows:
        if (r["prompt"], r["gen"]) not in pairs:
            pairs.append((r["prompt"], r["gen"]))
    return models, pairs


def _cache_rank(label: str) -> int:
    """Position of a cache label in :data:`E2E_CACHE_ORDER` (unknown labels last)."""
    return E2E_CACHE_ORDER.index(label) if label in E2E_CACHE_ORDER else len(E2E_CACHE_ORDER)


def e2e_best_table(raw: dict):
    """The grid's ``best`` entries (best tokens/s under the KV budget per model, prompt P, generated
    G and cache) as a table, with the speed-ups over the file's dense baseline.

    The baseline is the dense cache of the file (``dense``: DynamicCache, or ``static``: StaticCache;
    ``dense`` if both). The ratios are computed here from the table's own tokens/s
    (``best / best of the baseline`` and ``tokens/s at batch 8 / the baseline's at batch 8``); they
    equal the ``best_over_best_<baseline>`` / ``at_batch_8_over_<baseline>`` that
    ``mustafar.bench.e2e.derive`` stores with each compressed entry.

    Parameters
    ----------
    raw : a parsed ``mustafar.bench.e2e --grid`` results dict
        (:func:`mustafar.analysis.results.read_results_json`).

    Returns
    -------
    DataFrame with columns ``model, P:G, prompt, gen, cache`` (label of :func:`e2e_cache_label`),
    ``best_tok_per_s, best_batch, max_batch, kv_gib_at_best, tok_per_s_at_batch_8,
    best_over_best_<baseline>, at_batch_8_over_<baseline>`` (NaN on the baseline's own rows and
    where a batch-8 row is missing); ordered by model, the file's P:G pairs, the baseline, then
    :data:`E2E_CACHE_ORDER`. ``attrs["baseline"]`` is ``"dense"`` or ``"static"``.
    """
    import pandas as pd

    best = list(raw.get("best") or [])
    if not best:
        return pd.DataFrame()
    kinds = {e["cache"] for e in best}
    base = "dense" if "dense" in kinds else ("static" if "static" in kinds else None)
    models, pairs = _e2e_order(raw)
    rows = []
    for e in best:
        at8 = float(e["tok_per_s_at_batch_8"]) if e.get("tok_per_s_at_batch_8") is not None else float("nan")
        rows.append({"model": e["model"], "P:G": f"{e['prompt']}:{e['gen']}", "prompt": int(e["prompt"]),
                     "gen": int(e["gen"]), "cache": e2e_cache_label(e["cache"], e.get("sparsity")),
                     "kind": e["cache"], "best_tok_per_s": float(e["best_tok_per_s"]),
                     "best_batch": int(e["best_batch"]), "max_batch": int(e["max_batch"]),
                     "kv_gib_at_best": e.get("kv_gib_at_best"), "tok_per_s_at_batch_8": at8})
    df = pd.DataFrame(rows)
    r_best, r_8 = f"best_over_best_{base}", f"at_batch_8_over_{base}"
    df[r_best] = float("nan")
    df[r_8] = float("nan")
    if base is not None:
        ref = df[df["kind"] == base].set_index(["model", "prompt", "gen"])
        for i, r in df.iterrows():
            key = (r["model"], r["prompt"], r["gen"])
            if r["kind"] == base or key not in ref.index:
                continue
            d = ref.loc[key]
            df.loc[i, r_best] = r["best_tok_per_s"] / d["best_tok_per_s"]
            df.loc[i, r_8] = r["tok_per_s_at_batch_8"] / d["tok_per_s_at_batch_8"]
    df["_m"] = df["model"].map({m: i for i, m in enumerate(models)})
    df["_p"] = [pairs.index((p, g)) for p, g in zip(df["prompt"], df["gen"])]
    df["_c"] = [0 if k == base else 1 + _cache_rank(c) for k, c in zip(df["kind"], df["cache"])]  # baseline first
    df = df.sort_values(["_m", "_p", "_c"]).drop(columns=["_m", "_p", "_c", "kind"]).reset_index(drop=True)
    df.attrs["baseline"] = base
    return df


def e2e_targets(best, model: str = "llama2-7b", prompt: int = 4096, batch_8_target: float = 1.4,
                best_target: float = 2.0):
    """The GPU issue's end-to-end targets, judged from an :func:`e2e_best_table`: for ``model`` at
    ``prompt`` tokens, MustafarCache's tokens/s at batch 8 over the dense baseline's (target
    ``>= batch_8_target``) and its best tokens/s under the KV budget over the baseline's best
    (target ``>= best_target``).

    Returns
    -------
    DataFrame, one row per MustafarCache entry of that model and prompt: ``model, P:G, cache,
    baseline`` (``DynamicCache`` / ``StaticCache``), ``at_batch_8_over_dense``, ``batch_8_target``,
    ``batch_8_met``, ``best_over_best_dense``, ``best_target``, ``best_met`` (``"met"`` / ``"not met"``;
    ``"n/a"`` where a ratio is missing). Empty if the table has no such entry.
    """
    import pandas as pd

    if best is None or len(best) == 0:
        return pd.DataFrame()
    base = best.attrs.get("baseline") or next(c[len("best_over_best_"):] for c in best.columns
                                              if c.startswith("best_over_best_"))
    name = {"dense": "DynamicCache", "static": "StaticCache"}.get(base, str(base))
    sub = best[(best["model"] == model) & (best["prompt"] == int(prompt)) & best["cache"].str.startswith("mustafar")]

    def verdict(x, target):
        return "n/a" if x is None or not math.isfinite(float(x)) else ("met" if float(x) >= target else "not met")

    rows = []
    for _, r in sub.iterrows():
        b8, bb = r[f"at_batch_8_over_{base}"], r[f"best_over_best_{base}"]
        rows.append({"model": r["model"], "P:G": r["P:G"], "cache": r["cache"], "baseline": name,
                     "at_batch_8_over_dense": b8, "batch_8_target": f">= {batch_8_target:.1f}x",
                     "batch_8_met": verdict(b8, batch_8_target),
                     "best_over_best_dense": bb, "best_target": f">= {best_target:.1f}x",
                     "best_met": verdict(bb, best_target)})
    return pd.DataFrame(rows)


def e2e_tokens_vs_batch(*raws: dict):
    """Long form of the grids' ``derived`` rows (tokens/s over the G generated tokens per model,
    P, G, batch and cache) for a tokens/s-vs-batch figure.

    Several files can be given (e.g. the DynamicCache grid and the StaticCache one): their rows are
    concatenated and, where two files hold the same (model, P, G, cache, batch), the first file's
    row is kept (``source`` says which file, by position).

    Returns
    -------
    DataFrame with columns ``model, P:G, prompt, gen, batch, cache`` (label), ``tok_per_s,
    step_ms_mean, kv_gib, source``; ordered by model, the first file's P:G pairs, cache, batch.
    ``attrs["models"]`` and ``attrs["pairs"]`` give the panel order.
    """
    import pandas as pd

    rows, models, pairs = [], [], []
    for i, raw in enumerate(raws):
        if raw is None:
            continue
        ms, ps = _e2e_order(raw)
        models += [m for m in ms if m not in models]
        pairs += [p for p in ps if p not in pairs]
        for d in raw.get("derived") or []:
            rows.append({"model": d["model"], "P:G": f"{d['prompt']}:{d['gen']}", "prompt": int(d["prompt"]),
                         "gen": int(d["gen"]), "batch": int(d["batch"]),
                         "cache": e2e_cache_label(d["cache"], d.get("sparsity")),
                         "tok_per_s": float(d["tok_per_s"]), "step_ms_mean": d.get("step_ms_mean"),
                         "kv_gib": d.get("kv_gib"), "source": i})
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows).drop_duplicates(["model", "prompt", "gen", "cache", "batch"], keep="first")
    df["_m"] = df["model"].map({m: i for i, m in enumerate(models)})
    df["_p"] = [pairs.index((p, g)) for p, g in zip(df["prompt"], df["gen"])]
    df["_c"] = df["cache"].map(_cache_rank)
    df = df.sort_values(["_m", "_p", "_c", "batch"]).drop(columns=["_m", "_p", "_c"]).reset_index(drop=True)
    df.attrs["models"], df.attrs["pairs"] = models, [f"{p}:{g}" for p, g in pairs]
    return df


def e2e_longest_table(raw: dict):
    """The grid's ``longest`` rows: the longest context (tokens, a multiple of 1024) whose batch-1
    cache fits the KV budget, per model and cache, with its KV GiB and the decode step there.

    Returns
    -------
    DataFrame with columns ``model, cache, context, context_over_dense`` (over the same model's
    DynamicCache context), ``kv_gib, budget_gib, gpu_busy_ms, tok_per_s`` (batch 1, from the step
    time of ``time_source``), ``time_source``, ``oom_steps_down`` (contexts that ran out of memory
    first); rows that failed carry ``error``/``note`` instead of numbers.
    """
    import pandas as pd

    rows = []
    for r in raw.get("longest") or []:
        row = {"model": r["model"], "cache": e2e_cache_label(r["cache"], r.get("sparsity")),
               "context": int(r.get("context") or 0),
               "kv_gib": r.get("kv_gib"), "budget_gib": r.get("budget_gib"), "gpu_busy_ms": r.get("gpu_busy_ms"),
               "tok_per_s": r.get("tok_per_s"), "time_source": r.get("time_source"),
               "oom_steps_down": len(r.get("oom_steps_down") or [])}
        if r.get("error") or r.get("note"):
            row["problem"] = r.get("error") or r.get("note")
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    dense = df[df["cache"] == "dense DynamicCache"].set_index("model")["context"]
    df.insert(3, "context_over_dense", [c / dense[m] if m in dense.index and dense[m] else float("nan")
                                        for m, c in zip(df["model"], df["context"])])
    models = list(dict.fromkeys(df["model"]))
    df["_m"], df["_c"] = df["model"].map({m: i for i, m in enumerate(models)}), df["cache"].map(_cache_rank)
    return df.sort_values(["_m", "_c"]).drop(columns=["_m", "_c"]).reset_index(drop=True)


def e2e_linearity_table(raw: dict):
    """The grid's check that a decode step's time is affine in the context: at the midpoint
    configuration (``--midpoint P:G:B``) the step time measured at ``P + G/2`` against the mean of
    those at ``P`` and ``P + G`` (what the tokens/s derivation assumes).

    Returns
    -------
    DataFrame with columns ``model, cache, batch, prompt, gen, context, measured_ms,
    interpolated_ms, rel_error_pct`` (``100 * (interpolated - measured) / measured``).
    """
    import pandas as pd

    rows = [{"model": m["model"], "cache": e2e_cache_label(m["cache"], m.get("sparsity")), "batch": int(m["batch"]),
             "prompt": int(m["prompt"]), "gen": int(m["gen"]), "context": int(m["context"]),
             "measured_ms": float(m["measured_ms"]), "interpolated_ms": float(m["interpolated_ms"]),
             "rel_error_pct": 100.0 * float(m["rel_error"])}
            for m in (raw.get("linearity") or {}).get("midpoint") or []]
    return pd.DataFrame(rows)


def e2e_fit_residuals(raw: dict):
    """Per model and cache: over every (batch) sweep with three or more measured contexts, the
    largest relative residual of the least-squares line through its step times (``linearity.fits``).

    Returns
    -------
    DataFrame with columns ``model, cache, sweeps, max_rel_residual_pct, at_batch``.
    """
    import pandas as pd

    fits = (raw.get("linearity") or {}).get("fits") or []
    rows = {}
    for f in fits:
        key = (f["model"], e2e_cache_label(f["cache"], f.get("sparsity")))
        res = 100.0 * float(f["max_rel_residual"])
        cur = rows.setdefault(key, {"model": key[0], "cache": key[1], "sweeps": 0, "max_rel_residual_pct": -1.0,
                                    "at_batch": None})
        cur["sweeps"] += 1
        if res > cur["max_rel_residual_pct"]:
            cur["max_rel_residual_pct"], cur["at_batch"] = res, int(f["batch"])
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(list(rows.values()))
    models = list(dict.fromkeys(df["model"]))
    df["_m"], df["_c"] = df["model"].map({m: i for i, m in enumerate(models)}), df["cache"].map(_cache_rank)
    return df.sort_values(["_m", "_c"]).drop(columns=["_m", "_c"]).reset_index(drop=True)


def e2e_cycle_table(raw: dict):
    """MustafarCache's measured window cycle (``window_cycles``): per model, sparsity and batch the
    GPU-busy step with a full window, the compressing step and the step after it, and the two
    extras the tokens/s derivation adds per step: ``window_extra_ms = (full - after) / 2`` (the
    window's mean size) and ``compress_extra_ms_per_token = (compressing - after) / compress_chunk``.

    Returns
    -------
    DataFrame with columns ``model, cache, batch, full_ms, compress_ms, empty_ms, window_extra_ms,
    compress_extra_ms_per_token, schedule_ok``.
    """
    import pandas as pd

    rows = []
    for c in raw.get("window_cycles") or []:
        chunk = int(c.get("compress_chunk") or _DEFAULT_COMPRESS_CHUNK)
        full, comp, empty = float(c["full_ms"]), float(c["compress_ms"]), float(c["empty_ms"])
        rows.append({"model": c["model"], "cache": e2e_cache_label("compressed", c["sparsity"]), "batch": int(c["batch"]),
                     "full_ms": full, "compress_ms": comp, "empty_ms": empty, "window_extra_ms": 0.5 * (full - empty),
                     "compress_extra_ms_per_token": (comp - empty) / chunk, "schedule_ok": bool(c.get("schedule_ok"))})
    return pd.DataFrame(rows)


def e2e_token_checks(raw: dict):
    """Greedy tokens of ``mode="compressed"`` vs ``mode="simulate"`` (``checks`` of an e2e results
    file, ``mustafar.bench.e2e.token_check``), one row per model, dtype and sequence.

    Returns
    -------
    DataFrame with columns ``model, dtype, sequence, new_tokens, leading_tokens_equal,
    first_difference`` (position, or None when all tokens agree), ``top1_minus_top2`` (the simulate
    run's margin there), ``max_logit_diff_so_far`` (largest logit difference between the two runs up
    to there: the rounding noise) and ``margin_within_noise`` (``top1_minus_top2 <=
    max_logit_diff_so_far``: a flip of a near-tie by rounding; None where nothing differs).
    """
    import pandas as pd

    rows = []
    for c in raw.get("checks") or []:
        firsts = c.get("first_difference") or [None] * len(c["leading_tokens_equal"])
        for i, (lead, fd) in enumerate(zip(c["leading_tokens_equal"], firsts)):
            margin = fd["simulate_top1_minus_top2"] if fd else None
            noise = fd["max_logit_diff_up_to_here"] if fd else None
            rows.append({"model": c.get("model"), "dtype": c.get("dtype"), "sequence": i,
                         "new_tokens": int(c["new_tokens"]), "leading_tokens_equal": int(lead),
                         "first_difference": fd["position"] if fd else None, "top1_minus_top2": margin,
                         "max_logit_diff_so_far": noise,
                         "margin_within_noise": (margin <= noise) if fd else None})
    df = pd.DataFrame(rows)
    if not df.empty:
        df["first_difference"] = df["first_difference"].astype("Int64")  # positions stay integers beside None
    return df


# --------------------------------------------------------------------------------------------------
# earlier runs, shown as history (results/archive/: python -m mustafar.bench.e2e without --grid)
# --------------------------------------------------------------------------------------------------


def e2e_generate_table(rows):
    """Wall-clock ``generate`` rows of an e2e results file (``rows``, read with
    :func:`mustafar.analysis.results.load_results`), each with its cache's display name.

    Parameters
    ----------
    rows : pandas.DataFrame
        Columns ``model, prompt, gen, batch, cache`` (``dense`` / ``compressed``), ``sparsity``,
        ``decode_tok_per_s`` ...

    Returns
    -------
    pandas.DataFrame
        ``rows`` plus ``config``: ``"dense"`` or ``"mustafar <sparsity>%"``.
    """
    return rows.assign(config=[("dense" if c == "dense" else f"mustafar {s:.0%}")
                               for c, s in zip(rows["cache"], rows["sparsity"])])


def e2e_step_table(raw: dict):
    """The per-step timings (``step_timing``) of an e2e results file, each with its cache's
    display name (:func:`e2e_cache_label`).

    Parameters
    ----------
    raw : dict
        A parsed ``mustafar.bench.e2e --step-timing`` results dict
        (:func:`mustafar.analysis.results.read_results_json`).

    Returns
    -------
    pandas.DataFrame
        One row per (model, prompt, batch, cache, sparsity): ``step_ms_median, gpu_busy_ms,
        tok_per_s_gpu_busy, kv_gib_est`` ... plus ``config``; empty if the file has no step
        timings.
    """
    import pandas as pd

    steps = pd.DataFrame(raw.get("step_timing") or [])
    if steps.empty:
        return steps
    return steps.assign(config=[e2e_cache_label(c, s) for c, s in zip(steps["cache"], steps["sparsity"])])
