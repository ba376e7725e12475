"""Notebook 04 (``04_accuracy``): the accuracy sweep of ``mustafar.eval`` loaded from
``results/accuracy_<model>.json`` (or run where cells are missing) and reduced to one row per
cache configuration.

Functions: :func:`accuracy_missing`, :func:`accuracy_results`, :func:`accuracy_table`,
:func:`strategy_label`. Summaries and the Pareto front are ``mustafar.eval.summarize`` /
``mustafar.eval.pareto``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mustafar.analysis.results import results_dir

__all__ = ["accuracy_missing", "accuracy_results", "accuracy_table", "strategy_label"]

#: display order of the configuration groups in :func:`accuracy_table` (unknown groups last).
GROUP_ORDER = {"dense": 0, "K-only": 1, "V-only": 2, "joint": 3, "asymmetric": 4}

def accuracy_missing(results: dict, profile: str, model: str = "smollm2-135m", seed: int = 0,
                     suites: Sequence[str] = ("ruler", "ppl")) -> list[tuple]:
    """Cells of ``profile`` (``mustafar.eval.sweep.PROFILES``) a results dict lacks.

    Cells are compared with ``mustafar.eval.sweep.cell_key`` (every parameter of a cell: model, suite,
    task, context length, samples, seed, every spec field), exactly as the sweep's own resume does.
    LongBench is not checked (it runs only where its data files are supplied).

    Parameters
    ----------
    results : dict
        A sweep results dict (``cells`` list), e.g. from ``mustafar.eval.sweep.load_results``.
    profile : str
        A key of ``mustafar.eval.sweep.PROFILES``.
    model : str
    seed : int
    suites : sequence of str
        Suites checked (``"ruler"``, ``"ppl"``).

    Returns
    -------
    list of tuple
        The missing ``(suite, task, context_length, config)`` tuples (empty: complete).
    """
    from mustafar.eval import sweep

    if profile not in sweep.PROFILES:
        raise ValueError(f"unknown profile {profile!r}; available: {list(sweep.PROFILES)}")
    prof = sweep.PROFILES[profile]
    have = {sweep.cell_key(c) for c in results.get("cells", [])}
    missing = []
    for spec in sweep.profile_specs(profile):
        want = []
        if "ruler" in suites:
            want += [dict(suite="ruler", task=t, context_length=int(n), n_samples=int(prof["ruler_samples"]))
                     for n in prof["ruler_lengths"] for t in prof["ruler_tasks"]]
        if "ppl" in suites:
            pp = prof["ppl"]
            want.append(dict(suite="ppl", task="prose_ppl", context_length=int(pp["prefill_tokens"]),
                             n_samples=int(pp["n_segments"]), eval_tokens=pp["eval_tokens"], n_segments=pp["n_segments"]))
        for w in want:
            cell = dict(model=model, seed=seed, **w, **spec.to_dict())
            if sweep.cell_key(cell) not in have:
                missing.append((w["suite"], w["task"], w["context_length"], spec.name))
    return missing


def accuracy_results(model: str = "smollm2-135m", profile: str = "quick", run_missing: bool = True,
                     out_dir: str | os.PathLike | None = None) -> tuple[dict, str]:
    """The accuracy sweep of ``model`` for ``profile``: loaded from ``results/accuracy_<model>.json``
    when that file already holds every cell of the profile, otherwise run (resuming what is there)
    with ``mustafar.eval.run_sweep`` when ``run_missing``.

    Parameters
    ----------
    model : str
        A name ``mustafar.models.load_model`` accepts.
    profile : str
        A key of ``mustafar.eval.sweep.PROFILES``.
    run_missing : bool
        Run the missing cells (else only report them).
    out_dir : path-like, optional
        Folder of the results file; default :func:`mustafar.analysis.results.results_dir`.

    Returns
    -------
    (dict, str)
        The results dict (with a ``cells`` list) and a status line saying what happened.
    """
    from mustafar.eval import run_sweep, sweep

    out = Path(out_dir) if out_dir is not None else results_dir()
    path = out / f"accuracy_{model.replace('/', '_')}.json"
    results = sweep.load_results(path)
    missing = accuracy_missing(results, profile, model)
    if not missing:
        return results, f"loaded {path} ({len(results['cells'])} cells; complete for profile {profile!r})"
    if not run_missing:
        return results, f"{path}: {len(missing)} cells of profile {profile!r} missing and run_missing=False"
    n_before = len(missing)
    results = run_sweep(model=model, profile=profile, out_dir=out, resume=True,
                        command=f"mustafar.analysis.accuracy.accuracy_results({model!r}, {profile!r})")
    return results, f"ran mustafar.eval.run_sweep(profile={profile!r}): {n_before} missing cells computed -> {path}"


def accuracy_table(results: dict, profile: str | None = None):
    """One row per configuration: group, strategies, sparsities, mode, fp16 bytes ratio, mean score
    over the RULER (and LongBench) cells (``avg``, %), and prose perplexity (``ppl``).

    Config names are rebuilt from each cell's spec fields (``CacheSpec(...).name``), as
    ``mustafar.eval.summarize`` does, so they match its tables even across renames; with ``profile``
    only the cells made with that profile's settings are used.

    Parameters
    ----------
    results : dict
        A sweep results dict (``cells`` list).
    profile : str, optional
        Keep only the cells of this profile's settings.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``config``; columns ``group, mode, k_strategy, v_strategy, k_sparsity,
        v_sparsity, bytes_ratio`` (those the cells have), ``avg`` and ``ppl``; ordered by
        :data:`GROUP_ORDER`, strategy and sparsities.
    """
    import pandas as pd
    from mustafar.eval import sweep
    from mustafar.eval.runtime import CacheSpec

    cells = list(results.get("cells", []))
    if profile is not None:
        prof = (results.get("profiles") or {}).get(profile) or sweep.PROFILES.get(profile)
        in_profile = getattr(sweep, "_in_profile", None)
        if prof is not None and in_profile is not None:
            cells = [c for c in cells if in_profile(c, prof)]
    if not cells:
        return pd.DataFrame()
    df = pd.DataFrame(cells)
    df["config"] = [CacheSpec(**{f: c.get(f) for f in sweep._SPEC_FIELDS if c.get(f) is not None}).name for c in cells]
    keys = [k for k in ("group", "mode", "k_strategy", "v_strategy", "k_sparsity", "v_sparsity", "bytes_ratio")
            if k in df.columns]
    meta = df.groupby("config")[keys].first()
    scored = df[df["suite"] != "ppl"]
    meta["avg"] = scored.groupby("config")["score"].mean() if not scored.empty else float("nan")
    meta["ppl"] = (df[df["suite"] == "ppl"].groupby("config")["ppl"].mean() if "ppl" in df.columns
                   else float("nan"))
    meta["_o"] = meta["group"].map(GROUP_ORDER).fillna(len(GROUP_ORDER))
    return meta.sort_values(["_o", "k_strategy", "k_sparsity", "v_sparsity"]).drop(columns="_o")


def strategy_label(row) -> str:
    """Short label of a configuration's strategy: the K strategy where K is pruned, else the V
    strategy where V is, else ``"dense"``.

    Parameters
    ----------
    row : mapping
        A row of :func:`accuracy_table` (``k_sparsity, k_strategy, v_sparsity, v_strategy``).

    Returns
    -------
    str
    """
    if row.get("k_sparsity", 0) and row.get("k_sparsity", 0) > 0:
        return str(row.get("k_strategy"))
    if row.get("v_sparsity", 0) and row.get("v_sparsity", 0) > 0:
        return str(row.get("v_strategy"))
    return "dense"

