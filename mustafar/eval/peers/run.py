"""The peers runner: every method on the accuracy suite's RULER samples; results file I/O and merge.

Per sample and variant, **one** prefill of the context (eager attention, every press's ``compress``
in one shared hook: :mod:`.presses`), then one cache per method (:mod:`.caches`) and kvpress's
``generate_answer`` (:mod:`.prompts`) with the suite's early-stop rule (:func:`mustafar.eval.ruler.stop_rule`;
greedy, so stopping early only truncates) and the same per-task ``max_new_tokens``.

The results JSON (``<out>/peers_<model>.json`` + a CSV of :func:`.stats.summarize`) carries a
``provenance`` block, is rewritten atomically (temp file + ``os.replace``) after every (task, length)
group and is resumed cell by cell (:func:`cell_key`: model, task, length, samples, seed, method).
Methods this environment cannot run (:func:`.specs.unavailable`) are skipped and listed in
``notes["skipped"]``; ``make peers`` runs both environments and merges (:func:`merge`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .accounting import cache_bytes_ratio, end_bytes
from .caches import build_peer_cache, compressed_layers
from .presses import make_press, shared_prefill
from .prompts import answer, cell_samples
from .specs import PROFILES, keep_ratios, profile_specs, unavailable
from .stats import summarize, wilson

__all__ = ["run_peers", "cell_key", "load", "save", "merge", "NOTES"]

NOTES = dict(
    prefill="one eager prefill per sample and variant; every press compress()es in one shared hook "
            "(exact: a press's hook runs after the layer's attention)",
    decode="generate_answer of kvpress's pipeline + the suite's early stop (ruler.stop_rule)",
    ci="Wilson 95% with p = mean per-sample score, n = samples",
    bytes_ratio="fp16 bytes per context token of the compressed layers vs dense, measured on the real tensors "
                "after compression (the asymptotic ratio; x axis of the Pareto plot)",
    bytes_ratio_cache="whole cache after the context, every layer (hybrid models: sliding layers dense)",
    bytes_ratio_end="real bytes held at the end of decoding / dense bytes of the same tokens, same dtype",
    joint="simulate mode (dense tensors with the pruned / quantized values): the kernel does not read "
          "these combinations (KIVI-quantized kept values; H2O eviction before pruning)",
    hybrid="models with sliding-window and global layers (Gemma 3): every method compresses the global "
           "layers only; sliding layers keep their dense window (kvpress's Gemma 3 rule, MustafarCache's design)",
)

_KEY_FIELDS = ("model", "task", "context_length", "n_samples", "seed", "family", "method", "ratio", "sparsity",
               "nbits", "qic")


def cell_key(c: dict) -> str:
    """Identity of a cell (what resume and merge compare)."""
    return json.dumps({k: c.get(k) for k in _KEY_FIELDS}, sort_keys=True)


def save(results: dict, path: Path) -> None:
    """Write the JSON atomically and the summary CSV next to it."""
    from mustafar.provenance import write_json_atomic

    path = write_json_atomic(results, path)
    df = summarize(results)
    tmpc = path.with_suffix(".csv.tmp")
    df.to_csv(tmpc, index=False)
    os.replace(tmpc, path.with_suffix(".csv"))


def load(path) -> dict:
    """A results file, or an empty one when ``path`` does not exist (the sweep's reader: same layout)."""
    from ..sweep import load_results

    return load_results(path)


def _union_profile(old: dict | None, new: dict) -> dict:
    out = dict(new)
    if old:
        for k in ("tasks", "lengths", "qic_lengths"):
            out[k] = list(dict.fromkeys(list(old.get(k, [])) + list(new.get(k, []))))
    return out


def merge(paths, out_path, command: str | None = None) -> dict:
    """Union of the cells of several results files (first file wins on duplicate cells); profiles'
    task and length lists are unioned. Writes ``out_path`` (+ CSV) with a fresh provenance block and
    each input's provenance under ``merged_from``."""
    from mustafar.provenance import collect

    merged = load("/nonexistent")
    seen = set()
    for p in paths:
        r = load(p)
        for k, v in r.get("profiles", {}).items():
            merged["profiles"][k] = _union_profile(merged["profiles"].get(k), v)
        notes = dict(r.get("notes") or {})
        skipped = notes.pop("skipped", {})
        merged["notes"].update(notes)
        merged.setdefault("merged_from", []).append({"path": str(p), "provenance": r.get("provenance"),
                                                      "last_run": r.get("last_run"), "skipped": skipped})
        for c in r["cells"]:
            if cell_key(c) not in seen:
                seen.add(cell_key(c))
                merged["cells"].append(c)
    merged["provenance"] = collect(command)
    save(merged, Path(out_path))
    return merged


def run_peers(model_name: str = "smollm2-135m", profile: str = "quick", out_dir="results", out_name=None,
              specs=None, tasks=None, lengths=None, samples=None, seed: int = 0, model_obj=None, tokenizer=None,
              resume: bool = True, progress: bool = True, command: str | None = None, prompts=None) -> dict:
    """Run (or resume) the peers on the profile's RULER cells; writes ``<out_dir>/peers_<model>.json`` + csv.

    ``specs`` default to every method of :func:`.specs.profile_specs`; those this environment cannot
    run are skipped (``notes["skipped"]``). The question-in-context variant runs at the profile's
    ``qic_lengths`` (and at lengths outside the profile given with ``lengths``). ``prompts``: a prompts
    file shared between environments (:func:`.prompts.cell_samples`).
    """
    from tqdm.auto import tqdm

    from mustafar.provenance import collect

    from .. import ruler
    from ..metrics import ruler_sample_score

    prof = dict(PROFILES[profile])
    tasks = tuple(tasks or prof["tasks"])
    lengths = tuple(lengths or prof["lengths"])
    n = int(samples or prof["samples"])
    # qic at the profile's qic_lengths, and at any length outside the profile (an explicit request)
    qic_lengths = tuple(int(x) for x in lengths if x in prof.get("qic_lengths", lengths) or x not in prof["lengths"])
    if model_obj is None:
        from mustafar.models import load_model
        model_obj, tokenizer = load_model(model_name)
    model = model_obj
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    specs = list(specs) if specs is not None else profile_specs(D)
    skipped = {s.name: why for s in specs if (why := unavailable(s))}
    specs = [s for s in specs if s.name not in skipped]
    if skipped and progress:
        print(f"[peers] skipped here ({len(skipped)}): {sorted(set(skipped.values()))}", flush=True)
    cl = compressed_layers(model)
    path = Path(out_dir) / (out_name or f"peers_{model_name.replace('/', '_')}.json")
    results = load(path) if resume else load("/nonexistent")
    results["provenance"] = collect(command)
    results.setdefault("profiles", {})[profile] = _union_profile(
        results["profiles"].get(profile), dict(tasks=list(tasks), lengths=list(lengths), samples=n, seed=seed,
                                               qic_lengths=list(qic_lengths)))
    results["notes"] = dict(NOTES, keep_ratios=list(keep_ratios(D)), head_dim=D, skipped=skipped,
                            compressed_layers=[i for i, c in enumerate(cl) if c], n_layers=len(cl))
    done = {cell_key(c) for c in results["cells"]}
    t_start = time.perf_counter()
    for L in lengths:
        for task in tasks:
            base = dict(model=model_name, task=task, context_length=int(L), n_samples=n, seed=seed)
            pend = [s for s in specs if cell_key(dict(base, **s.to_dict())) not in done
                    and (not s.qic or int(L) in qic_lengths)]
            if not pend:
                continue
            smps = cell_samples(prompts, model_name, tokenizer, task, int(L), n, seed)
            acc = {s.name: dict(scores=[], preds=[], br=[], brc=[], real=0, dense=0, sec=0.0, sha=[], ctx=[])
                   for s in pend}
            prefill_s = 0.0
            bar = tqdm(total=len(smps) * len(pend), desc=f"peers {task}@{L}", disable=not progress, leave=False)
            for smp in smps:
                stop = ruler.stop_rule(task, len(smp["answers"]))
                for qic in (False, True):
                    group = [s for s in pend if s.qic == qic]
                    if not group:
                        continue
                    v = "qic" if qic else "std"
                    cids, qids = (torch.tensor([x]) for x in smp["ids"][v])
                    keys_needed = sorted({(s.method, s.ratio) for s in group if s.family == "kvpress"}
                                         | {("ObservedAttention", s.ratio) for s in group if s.method == "h2o+tok"})
                    presses = {k: make_press(k[0], k[1]) for k in keys_needed}
                    t0 = time.perf_counter()
                    keys, values, comp = shared_prefill(model, cids, presses)
                    prefill_s += time.perf_counter() - t0
                    T = int(cids.shape[1])
                    dense_tokens = [int(k.shape[-2]) for k in keys]
                    for s in group:
                        t0 = time.perf_counter()
                        cache, br = build_peer_cache(model, s, keys, values, comp,
                                                     qids.shape[1] + smp["max_new_tokens"] + 1, T)
                        pred, n_fed = answer(model, tokenizer, cache, qids, T, smp["max_new_tokens"], stop)
                        real, dense = end_bytes(cache, keys, n_fed, T)
                        a = acc[s.name]
                        a["sec"] += time.perf_counter() - t0
                        a["scores"].append(ruler_sample_score(pred, smp["answers"], smp["metric"]))
                        a["preds"].append(pred)
                        a["br"].append(br)
                        a["brc"].append(cache_bytes_ratio(br, dense_tokens, cl))
                        a["real"] += real
                        a["dense"] += dense
                        a["sha"].append(smp["ids_sha256"][v])
                        a["ctx"].append(T)
                        del cache
                        bar.update(1)
                    del keys, values, comp
            bar.close()
            for s in pend:
                a = acc[s.name]
                p = sum(a["scores"]) / len(a["scores"])
                lo, hi = wilson(p, len(a["scores"]))
                c = dict(base, **s.to_dict(), name=s.name, profile=profile, variant=s.variant,
                         score=round(100 * p, 2), ci95_lo=round(100 * lo, 2), ci95_hi=round(100 * hi, 2),
                         n=len(a["scores"]), sample_scores=a["scores"], preds=a["preds"],
                         answers=[x["answers"] for x in smps],
                         chance=round(100 * sum(x["chance"] for x in smps) / len(smps), 3),
                         bytes_ratio=round(sum(a["br"]) / len(a["br"]), 6),
                         bytes_ratio_cache=round(sum(a["brc"]) / len(a["brc"]), 6),
                         # joint cells are simulated (dense tensors): no real end-of-decode bytes
                         bytes_ratio_end=(round(a["real"] / a["dense"], 6) if a["dense"] and s.family != "joint"
                                          else None),
                         context_tokens=a["ctx"], prompt_ids_sha256=a["sha"],
                         seconds_decode=round(a["sec"], 2), seconds_prefill_shared=round(prefill_s, 2))
                results["cells"].append(c)
                done.add(cell_key(c))
            save(results, path)
            if progress:
                print(f"[peers] {task}@{L}: {len(pend)} cells ({time.perf_counter() - t_start:.0f}s)", flush=True)
    results["last_run"] = dict(profile=profile, seconds=round(time.perf_counter() - t_start, 1),
                               tasks=list(tasks), lengths=list(lengths), cells=len(results["cells"]))
    results.setdefault("runs", []).append(dict(results["last_run"], date=results["provenance"].get("date")))
    save(results, path)
    return results
