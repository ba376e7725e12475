"""Accuracy sweep: model x task x KV-pruning configuration -> ``results/accuracy_<model>.json`` + ``.csv``.

``run_sweep(model="smollm2-135m", profile="quick")`` (CLI: ``python -m mustafar.eval sweep --model
smollm2-135m --profile quick|full``) evaluates every :class:`~mustafar.eval.runtime.CacheSpec` of the
profile on:

- RULER-style synthetic tasks (:mod:`mustafar.eval.ruler`) at the profile's context lengths,
- perplexity of natural text decoded through the pruned cache (:mod:`mustafar.eval.perplexity`),
- LongBench (:mod:`mustafar.eval.longbench`) when ``longbench_dir`` (or ``$MUSTAFAR_LONGBENCH_DIR``)
  holds its JSONL files; otherwise it prints how to supply them and skips.

Configurations: K-only / V-only / joint per-token magnitude at {0.3, 0.5, 0.7, 0.8, 0.9},
per-channel magnitude, output-aware (per-token and per-channel), ThinK (K only), 2:4 and the
asymmetric pairs K 50% with V 70/80%, plus dense. Each cell records the cache mode used
(every pruned spec runs in :class:`mustafar.cache.MustafarCache`: ``compressed`` where each pruned
side has a fixed kept count per token vector, ``simulate`` otherwise; query-driven strategies get
the prefill's captured queries; see :mod:`mustafar.eval.runtime`), the measured
cache bytes relative to dense (``bytes_ratio_measured``: ``MustafarCache.nbytes() /
dense_nbytes()`` at the end of decoding, includes the dense window; null for ``dense`` /
``simulate`` cells, whose cache is stored dense)
and the format's asymptotic fp16 bytes relative to dense (``bytes_ratio``, used by :func:`mustafar.eval.tables.pareto`).

Resumable: a cell is keyed by all of its parameters (model, suite, task, context length, samples,
seed, every spec field); finished cells found in the output JSON are skipped, except cells whose
stored ``mode`` differs from the spec's current mode (e.g. old ``offline`` cells), which are
dropped and recomputed (:func:`refresh_cells`). The file is rewritten
(atomically) after every (task, length) group.

Cost model (one dense prefill per sample, shared by all configurations; one greedy decode per
configuration, stopped early once the task's answer items are out): per sample
``t_prefill(L) + n_specs * t_decode(task)``. Measured on this 2-core CPU machine (2026-11-28, other
jobs running alongside: load average ~2-4), SmolLM2-135M fp32, 1 thread per process, 1K-token
prompts, all 12 quick configs through the current code (query-driven ones in ``MustafarCache``):

===============  ====================  ==========================================
task             prefill / sample (s)  decode / config / sample (s): mean (min-max)
===============  ====================  ==========================================
niah_single      10.2                  2.9 (1.2-5.0)
niah_multikey    6.5                   1.7 (0.9-3.5)
niah_multivalue  13.2                  9.8 (1.7-16.7)
niah_multiquery  9.2                   9.6 (0.8-14.3)
fwe              13.4                  5.6 (2.7-9.0)
prose_ppl        (1K + 16 tokens)      4.7 (2.5-5.9)
===============  ====================  ==========================================

A decode step costs ~0.13-0.16 s at 1K and ~1.1x that at 2K; a 2K prefill ~2.1x a 1K one
(measured alone: 6.0 s -> 12.6 s). **Quick profile** (12 configs, 5 tasks x 2 samples at 1K, ppl
1K+16): measured **488 s wall** (8.1 min) as two parallel 1-thread shards (sum of the shards
931 s; the model above predicts 870 s), see ``notes["wall_time"]`` in the results JSON.
**Full profile** (35 configs, 5 tasks x {1K, 2K} x 3 samples, ppl 2K+64): measured as two
one-thread shards (``--jobs 2``, the task split of ``SHARDS``): the slower shard's cells sum to
**5109 s (85 min)**, the other's to 4077 s (1K half on 2026-11-28 under load ~2-4, 2K half +
perplexity the same day on a quiet machine: 44 and 40 min wall); one process would take ~2.6 h. See
``notes["wall_time"]["full"]`` in ``results/accuracy_smollm2-135m.json``. One command runs and
merges the shards (``run_sharded``)::

    python -m mustafar.eval sweep --model smollm2-135m --profile full --jobs 2

which writes ``accuracy_<model>.full.shard{0,1}.json`` (resumable) and merges them into
``accuracy_<model>.json``. ``--jobs 2`` is the CLI's default on a machine with two or more cores
(unless ``--tasks``, ``--out-name`` or ``--threads`` ask for a single process).

Estimates assume the load seen here; an idle machine is faster, a busier one slower (the earlier
``offline`` runs under load 8-13 took ~2x longer). Use ``ruler_samples`` / ``ruler_lengths``
overrides (CLI ``--samples``, ``--lengths``) and shards (``--tasks``, ``--out-name``,
:func:`merge_results`) to fit another budget. 2-3 samples per cell is a smoke test, not a
measurement (a RULER score then moves in steps of 33-50 / n_answers points).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterable, Sequence

from .runtime import CacheSpec, format_bytes_ratio

__all__ = ["PROFILES", "SHARDS", "profile_specs", "run_sweep", "run_sharded", "shard_tasks", "cell_key", "load_results",
           "save_results", "merge_results", "refresh_cells"]

SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9)
TOK, CHAN, OA, THINK, S24 = ("per_token_magnitude", "per_channel_magnitude", "output_aware", "think",
                              "semi_structured_2_4")


def _k(strat, s, gran="per_token"):
    return CacheSpec(k_strategy=strat, k_sparsity=s, k_granularity=gran)


def _v(strat, s, gran="per_token"):
    return CacheSpec(v_strategy=strat, v_sparsity=s, v_granularity=gran)


def _kv(strat, s, s_v=None, gran="per_token"):
    return CacheSpec(k_strategy=strat, v_strategy=strat, k_sparsity=s, v_sparsity=s if s_v is None else s_v,
                     k_granularity=gran, v_granularity=gran)


def profile_specs(profile: str) -> list[CacheSpec]:
    """The configurations of a profile (``"quick"``, ``"full"`` or ``"tiny"`` for tests)."""
    if profile == "tiny":
        return [CacheSpec(), _kv(TOK, 0.7), _k(THINK, 0.5)]
    if profile == "quick":
        return [CacheSpec(), _k(TOK, 0.7), _v(TOK, 0.7), _kv(TOK, 0.5), _kv(TOK, 0.7), _kv(TOK, 0.9),
                _k(CHAN, 0.7), _v(CHAN, 0.7), _k(OA, 0.7), _k(THINK, 0.7), _kv(S24, 0.5), _kv(TOK, 0.5, 0.7)]
    if profile == "full":
        specs = [CacheSpec()]
        for s in SPARSITIES:
            specs += [_k(TOK, s), _v(TOK, s), _kv(TOK, s)]
        for s in (0.5, 0.7):
            specs += [_k(CHAN, s), _v(CHAN, s), _k(OA, s), _v(OA, s), _k(THINK, s)]
        specs += [_kv(CHAN, 0.7), _kv(OA, 0.7), _k(OA, 0.7, "per_channel"), _v(OA, 0.7, "per_channel"),
                  _k(S24, 0.5), _v(S24, 0.5), _kv(S24, 0.5), _kv(TOK, 0.5, 0.7), _kv(TOK, 0.5, 0.8)]
        return specs
    raise ValueError(f"unknown profile {profile!r}; available: {list(PROFILES)}")


# RULER tasks kept for SmolLM2-135M-Instruct (dense above chance at 1K; vt and cwe dropped: dense at
# chance, see ruler.TASK_NOTES). Pass ruler_tasks=ruler.TASKS for larger models.
PROFILES = {
    "tiny": dict(ruler_tasks=("niah_single", "vt"), ruler_lengths=(1600,), ruler_samples=2,
                 ppl=dict(prefill_tokens=96, eval_tokens=8, n_segments=1), longbench_samples=2,
                 longbench_max_length=512, longbench_max_new_tokens=8),
    "quick": dict(ruler_tasks=("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "fwe"),
                  ruler_lengths=(1024,), ruler_samples=2,
                  ppl=dict(prefill_tokens=1024, eval_tokens=16, n_segments=1), longbench_samples=2,
                  longbench_max_length=2048, longbench_max_new_tokens=32),
    "full": dict(ruler_tasks=("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "fwe"),
                 ruler_lengths=(1024, 2048), ruler_samples=3,  # 85 min as `--jobs 2`: see the module docstring
                 ppl=dict(prefill_tokens=2048, eval_tokens=64, n_segments=1), longbench_samples=10,
                 longbench_max_length=7500, longbench_max_new_tokens=None),
}

# Task partitions for ``--jobs N`` (run_sharded): balanced on the measured per-task cost (module
# docstring); perplexity and LongBench go to the last shard. Profiles without an entry are split
# round-robin.
_TWO_SHARDS = (("niah_multivalue", "fwe", "niah_multikey"), ("niah_multiquery", "niah_single"))
SHARDS = {"full": {2: _TWO_SHARDS}, "quick": {2: _TWO_SHARDS}}

_SPEC_FIELDS = ("k_strategy", "v_strategy", "k_sparsity", "v_sparsity", "local_window", "k_granularity", "v_granularity")


def cell_key(cell: dict) -> str:
    """Stable key of a cell from all its parameters."""
    fields = ("model", "suite", "task", "context_length", "n_samples", "seed", "eval_tokens", "n_segments") + _SPEC_FIELDS
    return json.dumps({f: cell.get(f) for f in fields}, sort_keys=True)


def load_results(path) -> dict:
    """Read a results JSON (``{"provenance", "profiles", "notes", "cells"}``); empty skeleton if absent."""
    p = Path(path)
    if p.is_file():
        with open(p) as f:
            return json.load(f)
    return {"provenance": {}, "profiles": {}, "notes": {}, "cells": []}


_SCALAR_COLS = ("model", "suite", "task", "context_length", "n_samples", "seed", "config", "group", "mode",
                "k_strategy", "v_strategy", "k_sparsity", "v_sparsity", "local_window", "k_granularity",
                "v_granularity", "score", "chance", "ppl", "mean_nll", "bytes_ratio", "bytes_ratio_measured",
                "mean_prompt_tokens", "seconds_decode", "seconds_prefill_shared", "eval_tokens", "n_segments")


def refresh_cells(results: dict) -> list[dict]:
    """Bring stored cells up to date with the current :class:`CacheSpec` (in place).

    Each cell's ``config`` label is rebuilt from its spec fields (older runs wrote e.g.
    ``"K=2:450,V=2:450"`` for 2:4), and cells whose stored ``mode`` is no longer the mode the spec
    runs in (e.g. ``"offline"`` from before ``MustafarCache`` ran the query-driven strategies) are
    dropped, so a resumed sweep recomputes them.

    Returns
    -------
    list of the dropped cells.
    """
    keep, dropped = [], []
    for c in results.get("cells", []):
        if all(f in c for f in _SPEC_FIELDS):
            spec = CacheSpec(**{f: c[f] for f in _SPEC_FIELDS})
            if c.get("mode") != spec.mode:
                dropped.append(c)
                continue
            c["config"] = spec.name
        keep.append(c)
    results["cells"] = keep
    return dropped


def save_results(results: dict, json_path) -> None:
    """Write the JSON (atomically) and the tidy CSV next to it (one row per cell, scalar columns)."""
    import pandas as pd

    refresh_cells(results)
    from mustafar.provenance import write_json_atomic

    json_path = write_json_atomic(results, json_path)
    rows = [{c: cell.get(c) for c in _SCALAR_COLS} for cell in results["cells"]]
    pd.DataFrame(rows, columns=list(_SCALAR_COLS)).to_csv(json_path.with_suffix(".csv"), index=False)


_UNION_KEYS = ("ruler_tasks", "ruler_lengths")


def _union_profile(old: dict | None, new: dict) -> dict:
    """Profile settings stored in a results file: ``new``, with ``ruler_tasks`` / ``ruler_lengths``
    the ordered union of ``old``'s and ``new``'s (shards run with ``--tasks`` / ``--lengths`` add up
    to the whole profile; :func:`mustafar.eval.tables.summarize` filters cells with these settings)."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in new.items()}
    if old:
        for k in _UNION_KEYS:
            if k in old and k in out:
                out[k] = list(dict.fromkeys(list(old[k]) + list(out[k])))
    return out


def shard_tasks(profile: str, jobs: int, tasks: Sequence[str] | None = None) -> list[tuple[str, ...]]:
    """The RULER tasks of each of ``jobs`` shards (``SHARDS`` plan, else round-robin)."""
    tasks = tuple(tasks or PROFILES[profile]["ruler_tasks"])
    plan = SHARDS.get(profile, {}).get(jobs)
    if plan and sorted(t for sh in plan for t in sh) == sorted(tasks):
        return [tuple(sh) for sh in plan]
    return [tasks[i::jobs] for i in range(jobs) if tasks[i::jobs]]


def run_sharded(model: str = "smollm2-135m", profile: str = "full", jobs: int = 2, out_dir="results",
                extra_args: Sequence[str] = (), log=print) -> dict:
    """Run a profile as ``jobs`` parallel one-thread processes and merge them (CLI ``--jobs N``).

    Shard ``i`` writes ``accuracy_<model>.<profile>.shard<i>.json`` (resumable like any sweep), the
    last shard also runs perplexity and LongBench; then every shard is merged into
    ``accuracy_<model>.json`` (whose cells, e.g. of another profile, are kept). The wall time goes to
    ``notes["wall_time"][profile]`` of the merged file. On this 2-core machine ``jobs=2`` is right
    (one thread per process beats two threads in one process for these small matrix products).
    """
    import subprocess
    import sys

    safe = model.replace("/", "_")
    shards = shard_tasks(profile, jobs)
    procs, paths = [], []
    t0 = time.time()
    for i, tasks in enumerate(shards):
        name = f"accuracy_{safe}.{profile}.shard{i}.json"
        suites = "ruler,ppl,longbench" if i == len(shards) - 1 else "ruler"
        cmd = [sys.executable, "-m", "mustafar.eval", "sweep", "--model", model, "--profile", profile, "--threads", "1",
               "--out", str(out_dir), "--tasks", ",".join(tasks), "--suites", suites, "--out-name", name, *extra_args]
        log(f"shard {i}: {' '.join(cmd[1:])}")
        procs.append(subprocess.Popen(cmd))
        paths.append(Path(out_dir) / name)
    codes = [p.wait() for p in procs]
    wall = time.time() - t0
    if any(codes):
        raise RuntimeError(f"sweep shards failed with exit codes {codes}; rerun to resume")
    main = Path(out_dir) / f"accuracy_{safe}.json"
    merged = merge_results([*paths, *([main] if main.exists() else [])], main)
    merged.setdefault("notes", {}).setdefault("wall_time", {})[f"{profile}_last_sharded_run"] = {
        "wall_s": round(wall), "shards": len(shards), "threads_per_shard": 1,
        "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "note": "cells already present in the shard files were skipped (resume), so this is the time of the "
                "missing cells only",
    }
    save_results(merged, main)
    log(f"merged {len(paths)} shards into {main} ({wall / 60:.1f} min)")
    return merged


def merge_results(paths, out_path) -> dict:
    """Union of the cells of several result files (e.g. shards run in parallel), keyed by :func:`cell_key`.

    The first file's provenance/profiles/notes are kept (later files' profiles are added when new;
    the ``ruler_tasks`` / ``ruler_lengths`` of a profile are the union over the files);
    a cell present in several files is taken from the first. Writes ``out_path`` (+ CSV).
    """
    merged = None
    seen = set()
    for p in paths:
        r = load_results(p)
        refresh_cells(r)
        if merged is None:
            merged = {k: v for k, v in r.items() if k != "cells"}
            merged["cells"] = []
            merged["merged_from"] = []
        for k, v in r.get("profiles", {}).items():
            profs = merged.setdefault("profiles", {})
            if k not in profs:
                profs[k] = v
            else:  # earlier files' settings win; task / length lists are unioned
                u = _union_profile(profs[k], v)
                profs[k] = dict(profs[k], **{x: u[x] for x in _UNION_KEYS if x in u})
        for k, v in (r.get("notes") or {}).get("wall_time", {}).items():  # measured profile wall times
            merged.setdefault("notes", {}).setdefault("wall_time", {}).setdefault(k, v)
        merged["merged_from"].append({"path": str(p), "provenance": r.get("provenance"), "last_run": r.get("last_run")})
        for c in r["cells"]:
            key = cell_key(c)
            if key not in seen:
                seen.add(key)
                merged["cells"].append(c)
    if merged is None:
        raise ValueError("no result files given")
    save_results(merged, out_path)
    return merged


def _group(spec: CacheSpec) -> str:
    if spec.is_dense:
        return "dense"
    if spec.v_sparsity == 0.0:
        return "K-only"
    if spec.k_sparsity == 0.0:
        return "V-only"
    if spec.k_sparsity == spec.v_sparsity and spec.k_strategy == spec.v_strategy:
        return "joint"
    return "asymmetric"


def _base_cell(model_name, suite, task, length, n, seed, spec: CacheSpec, head_dim: int) -> dict:
    c = dict(model=model_name, suite=suite, task=task, context_length=length, n_samples=n, seed=seed,
             config=spec.name, group=_group(spec), mode=spec.mode,
             bytes_ratio=round(format_bytes_ratio(spec, head_dim), 6))
    c.update(spec.to_dict())
    return c


def run_sweep(model: str = "smollm2-135m", profile: str = "quick", out_dir="results", longbench_dir=None,
              resume: bool = True, progress: bool = True, seed: int = 0, model_obj=None, tokenizer=None,
              specs: Sequence[CacheSpec] | None = None, suites: Iterable[str] = ("ruler", "ppl", "longbench"),
              out_name: str | None = None, command: str | None = None, **overrides) -> dict:
    """Run (or resume) a sweep and write ``<out_dir>/accuracy_<model>.json`` + ``.csv``.

    Parameters
    ----------
    model : name for :func:`mustafar.models.load_model` (also names the output file).
    profile : ``"quick"``, ``"full"`` (or ``"tiny"`` for tests); ``overrides`` replace profile entries
        (e.g. ``ruler_samples=4``, ``ruler_lengths=(2048,)``).
    out_dir : folder of the result files.
    longbench_dir : folder with LongBench JSONL files (None: ``$MUSTAFAR_LONGBENCH_DIR``; absent: skipped).
    resume : skip cells already in the output file.
    model_obj, tokenizer : an already-loaded model (tokenizer None -> :class:`ByteTokenizer`).
    specs : configurations (default: ``profile_specs(profile)``).
    suites : subset of ``("ruler", "ppl", "longbench")``.

    Returns
    -------
    dict, the results (``cells`` list of dicts, ``provenance``, ``profiles``, ``notes``).
    """
    import torch

    from . import longbench as lb
    from . import ruler
    from .perplexity import run_perplexity
    from .runtime import ByteTokenizer

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; available: {list(PROFILES)}")
    prof = dict(PROFILES[profile])
    bad = set(overrides) - set(prof)
    if bad:
        raise ValueError(f"unknown profile overrides {sorted(bad)}; known: {sorted(prof)}")
    prof.update(overrides)
    specs = list(specs) if specs is not None else profile_specs(profile)
    suites = tuple(suites)
    if model_obj is None:
        from mustafar.models import load_model
        model_obj, tokenizer = load_model(model)
    if tokenizer is None:
        tokenizer = ByteTokenizer()
    head_dim = getattr(model_obj.config, "head_dim", None) or model_obj.config.hidden_size // model_obj.config.num_attention_heads
    safe = model.replace("/", "_")
    json_path = Path(out_dir) / (out_name or f"accuracy_{safe}.json")
    results = load_results(json_path) if resume else load_results("/nonexistent")
    stale = refresh_cells(results)
    if stale and progress:
        print(f"[sweep] dropped {len(stale)} stale cells (mode changed, e.g. 'offline'): recomputing them", flush=True)
    done = {cell_key(c) for c in results["cells"]}
    from mustafar.provenance import collect

    results["provenance"] = collect(command)
    profs = results.setdefault("profiles", {})
    profs[profile] = _union_profile(profs.get(profile), prof)
    old_notes = results.get("notes") or {}
    results["notes"] = {
        "ruler_tasks": ruler.TASK_NOTES,
        "haystack": "natural English prose of the Python Language Reference (stdlib pydoc_data/topics.py)",
        "bytes_ratio": "format fp16 bytes per token vs dense, asymptotic (mustafar.eval.runtime.format_bytes_ratio)",
        "bytes_ratio_measured": "MustafarCache.nbytes()/dense_nbytes() after decoding, buffers at capacity: incl. the "
                                "dense window buffer (local_window + compress_chunk + 1 rows) and strategy bookkeeping "
                                "(output-aware keeps a query accumulator as large as the window buffer), so at 1K it "
                                "sits far above bytes_ratio; null for dense / simulate cells",
        "modes": "compressed: MustafarCache bitmap store + sparse decode (per-token magnitude, 2:4, ThinK, "
                 "output-aware per-token); simulate: MustafarCache dense twin with pruned entries zeroed (per-channel "
                 "magnitude, output-aware per-channel); query-driven strategies get the prefill's captured post-RoPE "
                 "queries through cache.update(..., {'query_states': q}); dense: DynamicCache",
        "longbench": "English 16 datasets only",
    }
    if "wall_time" in old_notes:  # measured wall times of whole profile runs (written by hand / scripts)
        results["notes"]["wall_time"] = old_notes["wall_time"]
    n_new = 0
    t_start = time.perf_counter()

    def todo(suite, task, length, n, extra=None):
        out = []
        for s in specs:
            c = _base_cell(model, suite, task, length, n, seed, s, head_dim)
            c.update(extra or {})
            if cell_key(c) not in done:
                out.append((s, c))
        return out

    # ---------------- RULER
    if "ruler" in suites:
        for length in prof["ruler_lengths"]:
            for task in prof["ruler_tasks"]:
                pend = todo("ruler", task, int(length), int(prof["ruler_samples"]))
                if not pend:
                    continue
                samples = ruler.generate_samples(task, tokenizer, int(length), int(prof["ruler_samples"]), seed=seed)
                res = ruler.run_samples(model_obj, tokenizer, samples, [s for s, _ in pend], progress=progress)
                for s, c in pend:
                    r = res[s.name]
                    c.update(score=round(r["score"], 3), chance=round(ruler.chance_score(samples), 3),
                             sample_scores=r["sample_scores"], preds=r["preds"],
                             answers=[smp.answers for smp in samples],
                             mean_prompt_tokens=sum(smp.n_tokens for smp in samples) / len(samples),
                             seconds_decode=round(r["seconds_decode"], 2),
                             seconds_prefill_shared=round(r["seconds_prefill_shared"], 2),
                             bytes_ratio_measured=(round(r["bytes_measured"] / r["bytes_dense"], 4)
                                                   if r["bytes_dense"] and s.mode == "compressed" else None))
                    results["cells"].append(c)
                    done.add(cell_key(c))
                    n_new += 1
                save_results(results, json_path)
                if progress:
                    print(f"[sweep] ruler {task}@{length}: " + ", ".join(f"{s.name}={res[s.name]['score']:.0f}" for s, _ in pend)
                          + f"  ({time.perf_counter() - t_start:.0f}s)", flush=True)
    # ---------------- perplexity
    if "ppl" in suites:
        pp = prof["ppl"]
        extra = dict(eval_tokens=pp["eval_tokens"], n_segments=pp["n_segments"])
        pend = todo("ppl", "prose_ppl", int(pp["prefill_tokens"]), int(pp["n_segments"]), extra)
        if pend:
            res = run_perplexity(model_obj, tokenizer, [s for s, _ in pend], pp["prefill_tokens"], pp["eval_tokens"],
                                 pp["n_segments"], progress=progress)
            for s, c in pend:
                r = res[s.name]
                c.update(ppl=round(r["ppl"], 4), mean_nll=round(r["mean_nll"], 5), nll=[round(x, 4) for x in r["nll"]],
                         seconds_decode=round(r["seconds_decode"], 2),
                         bytes_ratio_measured=(round(r["bytes_measured"] / r["bytes_dense"], 4)
                                               if r["bytes_dense"] and s.mode == "compressed" else None))
                results["cells"].append(c)
                done.add(cell_key(c))
                n_new += 1
            save_results(results, json_path)
            if progress:
                print("[sweep] ppl: " + ", ".join(f"{s.name}={res[s.name]['ppl']:.2f}" for s, _ in pend), flush=True)
    # ---------------- LongBench
    if "longbench" in suites:
        data = lb.load_longbench(longbench_dir, n_samples=int(prof["longbench_samples"]))
        if not data:
            results["notes"]["longbench_status"] = "skipped: no LongBench JSONL files supplied"
        for ds, recs in data.items():
            pend = todo("longbench", ds, int(prof["longbench_max_length"]), len(recs))
            if not pend:
                continue
            res = lb.run_longbench(model_obj, tokenizer, {ds: recs}, [s for s, _ in pend],
                                   max_length=int(prof["longbench_max_length"]),
                                   max_new_tokens_cap=prof["longbench_max_new_tokens"], progress=progress)
            for s, c in pend:
                r = res[(ds, s.name)]
                c.update(score=r["score"], preds=r["preds"], seconds_decode=round(r["seconds_decode"], 2),
                         max_new_tokens=r["max_new_tokens"])
                results["cells"].append(c)
                done.add(cell_key(c))
                n_new += 1
            save_results(results, json_path)
    results["last_run"] = dict(profile=profile, new_cells=n_new, seconds=round(time.perf_counter() - t_start, 1))
    save_results(results, json_path)
    if progress:
        print(f"[sweep] {n_new} new cells in {time.perf_counter() - t_start:.0f}s -> {json_path}", flush=True)
    return results
