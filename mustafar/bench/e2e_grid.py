"""Decode tokens/s grid and longest context on a CUDA GPU, from measured decode *step* times.

``python -m mustafar.bench e2e-grid`` (= ``python -m mustafar.bench e2e --grid --longest``; either
spelling takes the options below and writes ``results/e2e_grid_h200.json`` by default)::

    python -m mustafar.bench e2e --grid --longest [--models llama2-7b llama3-8b]
        [--ratios 2048:1024 4096:1024 1024:4096 2048:2048] [--sparsities 0.5 0.7] [--dense-caches dense]
        [--grid-batches 1 8 16 32 64 128] [--kv-budget-gib 40] [--steps 5] [--midpoint 4096:1024:8]
        [--decode-kernel auto]

``e2e-grid`` without ``--grid`` / ``--longest`` runs both. The arithmetic (bytes, plan, derivation) is
:mod:`mustafar.bench.e2e_plan`; the fill, the caches and the step timing are
:mod:`mustafar.bench.common` and :mod:`mustafar.bench.steps`.

Running 1K+ real generate steps per configuration costs ~40 ms of CPU per eager 7-8B step, far
beyond the device time a full grid may take, so the grid measures decode *step* times and derives
tokens/s from them:

* No prefill: :func:`mustafar.bench.common.fill_cache` writes random K/V (N(0, 1), the model's dtype and KV shape) into
  the cache with ``cache.update`` per layer. The timed steps then run the real model (embedding,
  projections, attention over the cache, MLP, LM head) at positions ``length + i``; only the
  prompt's K/V are drawn instead of computed. The weights are random anyway, so a prefill's K/V
  would be random too, and the kernels' time depends on the shapes, the counts and the bitmaps'
  layout (a fixed number of kept values per token vector), not on the values.
* Contexts: the union of {P, P + G} over the (prompt P : generated G) pairs of ``--ratios``. Caches:
  ``dense`` (DynamicCache, sdpa without cuDNN), ``compressed`` (MustafarCache) at each
  ``--sparsities``, optionally ``static`` (StaticCache). Batches: those of ``--grid-batches`` plus
  the largest one whose cache sized for P + G tokens fits ``--kv-budget-gib`` (:func:`kv_bytes`:
  dense ``2 * layers * B * kv_heads * T * head_dim * 2`` bytes; MustafarCache exactly its
  ``nbytes()``: bitmaps, kept values and the dense window at capacity).
* Per (model, cache, batch) one cache is filled and extended context by context; at each context
  ``--steps`` wall-clock-timed steps (median) and 3 steps under ``torch.profiler`` give the GPU-busy
  time per step (union of the kernel intervals / 3), plus the peak memory during the steps (after a
  reset, minus the weights) and the cache's bytes. A StaticCache reads its whole preallocated buffer at
  every step, so it is measured once per ``max_cache_len = P + G``.
* tokens/s of (P, G, B) = ``B * G / (G * (t(P) + t(P + G)) / 2)``: a decode step's time is affine in
  the context (weights constant; attention and the DynamicCache re-copy linear), so the mean over
  the G steps is the mean of the two ends. This is checked, not assumed: ``--midpoint P:G:B`` also
  measures ``P + G / 2`` (default 4096:1024 at B=8, every cache), and every sweep with three or more
  contexts gets a fitted line and its residuals (``linearity``).
* MustafarCache's window: during decode it holds ``local_window`` to ``local_window + compress_chunk``
  dense tokens and every ``compress_chunk``-th step compresses the oldest ``compress_chunk`` (256)
  of them. The measured steps run with ~``local_window`` rows (right after a fill, like after a
  prefill), so at a few batches per sparsity a *window cycle* is measured before the sweep's first
  context: the step with a full window, the step that compresses (its counts are checked) and the
  steps after it. The derivation adds half the full-minus-after difference (the window's mean
  size) and the compressing step's extra time / ``compress_chunk`` per token, fitted affine in the
  batch.
* ``--longest``: at batch 1, the longest context (multiple of 1024) whose cache fits the budget,
  filled and timed the same way (on OOM it steps down by 10 % and records it).
* On CPU (``--device cpu``, smoke tests) there are no kernel times: the derivation uses the
  wall-clock medians and records ``time_source``. ``--estimate-only`` prints the plan and an H200
  wall-time estimate. The JSON is rewritten after every sweep (``complete: false`` until the end).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from mustafar.bench import steps as steps_mod
from mustafar.bench.common import (GIB, SDPA_BACKENDS_NOTE, cache_nbytes, command_line, default_out, fill_cache,
                                   free, is_oom, make_cache, mem_peak, mem_reset, provenance, sdpa_backends, sync,
                                   write_results)
from mustafar.bench.e2e_plan import (DEFAULT_GRID_BATCHES, DEFAULT_RATIOS, PROFILED_STEPS, cache_kinds,
                                     check_budget, derive, estimate_seconds, kv_bytes, kv_geometry, longest_context,
                                     parse_ratios, plan_grid, row_step_ms)
from mustafar.bench.steps import run_steps

__all__ = ["DECODE_KERNELS", "GRID_METHOD", "add_arguments", "main", "run_args", "run_grid"]

#: ``--decode-kernel`` choices: ``MustafarConfig.decode_kernel`` / ``mustafar.ops.sparse_decode(kernel=)``
DECODE_KERNELS = ("auto", "v4", "v5", "v6", "v6g")
PROG = "mustafar.bench e2e-grid"


def _compressed_tokens(cache) -> int:
    return int(cache.breakdown()["compressed_tokens"])


def _window_cycle(model, cache, batch, start_ctx, geo, seed, log, label) -> tuple[dict, object, int]:
    """Measure a MustafarCache's window cycle before the sweep's first context ``start_ctx``.

    Fill to ``A = start_ctx - chunk - 12`` tokens (window: ``local_window`` rows), append
    ``chunk - 1`` single tokens (window: ``local_window + chunk - 1``), then three profiled sessions:
    one step with the full window (``local_window + chunk`` rows, no compression: ``full_ms``), one
    step that compresses (the window exceeds ``local_window + chunk``: its ``chunk`` oldest tokens are
    pruned, encoded and appended to the store, ``compress_ms``) and three steps right after it (window
    ``local_window + 2..4``: ``empty_ms``). The compressed-token count is checked around each step.
    Leaves the cache at ``start_ctx - 8`` tokens; returns ``(row, next_token, position)``."""
    lw, chunk = geo["local_window"], geo["compress_chunk"]
    a = start_ctx - chunk - 12
    fill_cache(model, cache, batch, a + chunk - 1, seed=seed, tail=chunk - 1)
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    nxt = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev, generator=g)
    pos = a + chunk - 1
    n0 = _compressed_tokens(cache)
    full = run_steps(model, cache, nxt, pos, 0, 1)
    n1 = _compressed_tokens(cache)
    comp = run_steps(model, cache, full["next"], full["pos"], 0, 1)
    n2 = _compressed_tokens(cache)
    empty = run_steps(model, cache, comp["next"], comp["pos"], 0, 3)
    n3 = _compressed_tokens(cache)
    ok = (n1 == n0) and (n2 - n1 == chunk) and (n3 == n2)
    row = {}
    for key, r in (("full", full), ("compress", comp), ("empty", empty)):
        row[f"{key}_gpu_busy_ms"] = r["gpu_busy_ms"]
        row[f"{key}_wall_ms"] = r["profiled_wall_ms"]
    src = "gpu_busy" if all(row[f"{k}_gpu_busy_ms"] for k in ("full", "compress", "empty")) else "wall_profiled"
    for key in ("full", "compress", "empty"):
        row[f"{key}_ms"] = row[f"{key}_gpu_busy_ms"] if src == "gpu_busy" else row[f"{key}_wall_ms"]
    row.update({"batch": batch, "context": a + chunk - 1, "time_source": src, "schedule_ok": ok,
                "compressed_tokens_before_after": [n0, n1, n2, n3], "local_window": lw, "compress_chunk": chunk})
    log(f"  {label}: window cycle at ~{a + chunk} tokens: full window {row['full_ms']:.3f} ms, compressing step "
        f"{row['compress_ms']:.3f} ms, after {row['empty_ms']:.3f} ms ({src}); schedule "
        f"{'ok' if ok else 'NOT as expected: ' + str([n0, n1, n2, n3])}")
    if not ok:
        raise RuntimeError(f"window cycle: compressed-token counts {[n0, n1, n2, n3]} do not match the expected "
                           f"schedule (compress {chunk} tokens at the second step)")
    return row, empty["next"], empty["pos"]


class _Progress:
    def __init__(self, total: int, log):
        self.total, self.done, self.t0, self.log = max(total, 1), 0, time.perf_counter(), log

    def tick(self, n: int = 1) -> str:
        self.done += n
        el = time.perf_counter() - self.t0
        left = el / self.done * (self.total - self.done) if self.done else float("nan")
        return f"[{self.done}/{self.total}, {el:.0f} s, ~{left:.0f} s left]"


def _run_sweep(model, name, sw, geo, steps, base, log, prog, seed, out_rows, out_cycles, kernel="auto"):
    """One (kind, sparsity, batch) sweep of the plan: one cache, extended context by context (after the
    window cycle where the plan asks for it); appends measured rows to ``out_rows`` / ``out_cycles``
    (an error or OOM becomes a row with ``error``)."""
    kind, s, b = sw["kind"], sw["sparsity"], sw["batch"]
    dev = next(model.parameters()).device
    label = f"{name} {kind}{'' if kind != 'compressed' else f' s={s}'} B={b}"
    cache = make_cache(kind, model, s, sw["max_len"], kernel)
    nxt = None
    try:
        if sw["cycle"]:
            t = time.perf_counter()
            row, nxt, _ = _window_cycle(model, cache, b, sw["contexts"][0], geo, seed, log, label)
            row.update({"model": name, "sparsity": s, "seconds": time.perf_counter() - t})
            out_cycles.append(row)
        for ctx in sw["contexts"]:
            t = time.perf_counter()
            fill_cache(model, cache, b, ctx, seed=seed + ctx)
            sync(dev)
            fill_s = time.perf_counter() - t
            if nxt is None:
                g = torch.Generator(device=dev).manual_seed(seed)
                nxt = torch.randint(0, model.config.vocab_size, (b, 1), device=dev, generator=g)
            mem_reset(dev)
            r = run_steps(model, cache, nxt, ctx, steps, PROFILED_STEPS)
            nxt = r["next"]
            peak = mem_peak(dev, base)
            row = {"model": name, "cache": kind, "sparsity": s, "batch": b, "context": ctx,
                   "step_ms_median": r["step_ms_median"], "step_ms_all": r["times_ms"],
                   "profiled_wall_ms": r["profiled_wall_ms"], "gpu_busy_ms": r["gpu_busy_ms"],
                   "steps": steps, "profiled_steps": PROFILED_STEPS, "fill_s": fill_s,
                   "cache_gib": cache_nbytes(cache) / GIB, "cache_max_len": sw["max_len"],
                   "kv_gib_planned": kv_bytes(kind, s, geo, b, ctx) / GIB, "peak_mem_gib": peak,
                   "seq_length_after": int(cache.get_seq_length())}
            out_rows.append(row)
            gms = row["gpu_busy_ms"]
            log(f"{prog.tick()} {label} ctx={ctx}: fill {fill_s:.2f} s, step {row['step_ms_median']:.1f} ms wall, "
                f"GPU busy {'n/a' if gms is None else f'{gms:.2f} ms'}, cache {row['cache_gib']:.2f} GiB"
                + ("" if peak is None else f", peak {peak:.2f} GiB"))
    except Exception as exc:  # noqa: BLE001  (one failing configuration must not lose the others)
        oom = is_oom(exc)
        log(f"{'OOM' if oom else 'ERROR'} in {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        out_rows.append({"model": name, "cache": kind, "sparsity": s, "batch": b, "context": None, "oom": oom,
                         "error": f"{type(exc).__name__}: {str(exc)[:1000]}"})
    finally:
        del cache
        free(dev)


def _run_longest(model, name, geo, kinds, budget_bytes, steps, base, log, seed, kernel="auto") -> list[dict]:
    """Per cache kind, the longest batch-1 context that fits ``budget_bytes`` (:func:`longest_context`),
    filled and timed like a grid context; on OOM it steps down by 10 % and records it."""
    rows = []
    dev = next(model.parameters()).device
    extra = steps + PROFILED_STEPS + 8
    for kind, s in kinds:
        ctx = longest_context(kind, s, geo, budget_bytes, batch=1, multiple=1024, extra_tokens=extra)
        label = f"{name} {kind}{'' if kind != 'compressed' else f' s={s}'} B=1"
        tried = []
        while ctx >= 1024:
            cache = None
            try:
                cache = make_cache(kind, model, s, ctx + extra, kernel)
                t = time.perf_counter()
                fill_cache(model, cache, 1, ctx, seed=seed)
                sync(dev)
                fill_s = time.perf_counter() - t
                g = torch.Generator(device=dev).manual_seed(seed)
                nxt = torch.randint(0, model.config.vocab_size, (1, 1), device=dev, generator=g)
                mem_reset(dev)
                r = run_steps(model, cache, nxt, ctx, steps, PROFILED_STEPS)
                t_ms, src = row_step_ms(r)
                row = {"model": name, "cache": kind, "sparsity": s, "batch": 1, "context": ctx,
                       "kv_gib": cache_nbytes(cache) / GIB, "kv_gib_planned": kv_bytes(kind, s, geo, 1, ctx + extra) / GIB,
                       "budget_gib": budget_bytes / GIB, "peak_mem_gib": mem_peak(dev, base),
                       "step_ms_median": r["step_ms_median"], "gpu_busy_ms": r["gpu_busy_ms"],
                       "tok_per_s": 1e3 / t_ms if t_ms else None, "time_source": src, "fill_s": fill_s,
                       "oom_steps_down": tried}
                rows.append(row)
                log(f"longest {label}: {ctx} tokens, KV {row['kv_gib']:.2f} GiB, fill {fill_s:.1f} s, step "
                    f"{r['step_ms_median']:.1f} ms wall / GPU busy "
                    f"{'n/a' if r['gpu_busy_ms'] is None else round(r['gpu_busy_ms'], 2)} ms"
                    + ("" if row["peak_mem_gib"] is None else f", peak {row['peak_mem_gib']:.2f} GiB"))
                break
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    log(f"longest {label}: ERROR at {ctx} tokens: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                    rows.append({"model": name, "cache": kind, "sparsity": s, "batch": 1, "context": ctx,
                                 "oom_steps_down": tried, "error": f"{type(exc).__name__}: {str(exc)[:1000]}"})
                    break
                tried.append(ctx)
                log(f"longest {label}: OOM at {ctx} tokens; stepping down 10 %")
                ctx = int(ctx * 0.9) // 1024 * 1024
            finally:
                del cache
                free(dev)
        else:
            rows.append({"model": name, "cache": kind, "sparsity": s, "batch": 1, "context": 0,
                         "oom_steps_down": tried, "note": "not even 1024 tokens fit the budget / memory"})
    return rows


GRID_METHOD = (
    "Decode step times of random-weight models, the prompt's K/V drawn at random (N(0,1), model dtype) and "
    "written with cache.update per layer instead of computed by a prefill (mustafar.bench.common.fill_cache); the "
    "timed steps run the real model. Per (model, cache, batch) one cache is filled and extended context by "
    "context (StaticCache: one cache per max_cache_len = P+G). At each context: {steps} wall-clock-timed steps "
    "(median) then 3 steps under torch.profiler; gpu_busy_ms = union of the kernel intervals / 3 (HF's eager loop is "
    "CPU-bound on the H200, so GPU-busy time is the comparison a runtime without Python overhead would see); "
    "on CPU the wall-clock median is used instead (time_source). Tokens/s of (P, G, B): "
    "B*G / (G*(t(P)+t(P+G))/2), the decode step time being affine in the context (checked: linearity.midpoint "
    "measures P+G/2 for one configuration per model, linearity.fits the residuals of a line through every "
    "measured context); StaticCache reads its whole buffer each step: t(P+G). MustafarCache adds "
    "(t_full_window - t_after_compress)/2 (the window averages local_window + chunk/2 dense rows, the measured "
    "steps ~local_window) and (t_compressing_step - t_after_compress)/chunk (one step in chunk compresses chunk "
    "tokens), both measured at a few batches per sparsity and fitted affine in the batch (cycle_fit). Batches: "
    "those of --grid-batches plus the largest whose cache sized for P+G (+ the measured steps) fits the KV budget "
    "(kv_bytes: dense 2*L*B*H*T*D*2; MustafarCache exactly its nbytes incl. bitmaps and the dense window at "
    "capacity). peak_mem_gib: max_memory_allocated during the decode steps (after a reset, minus the weights' "
    "allocation; prefill transients are not part of it: there is no prefill), with the measured cache's "
    "allocated bytes replaced by those of a cache sized for P+G. Longest context: the largest multiple of 1024 "
    "whose batch-1 cache (+ the measured steps) fits the budget, filled and timed the same way.")


def _model_config(name):
    from transformers import AutoConfig

    from mustafar.models import PRESETS

    key = str(name).lower()
    if key in PRESETS:
        p = PRESETS[key]
        return AutoConfig.for_model(p["model_type"], **p["config"])
    return AutoConfig.from_pretrained(name, local_files_only=True)


def run_grid(models=("llama2-7b", "llama3-8b"), ratios=DEFAULT_RATIOS, sparsities=(0.5, 0.7),
             dense_caches=("dense",), batches=DEFAULT_GRID_BATCHES, kv_budget_gib=40.0, steps=5,
             midpoint=(4096, 1024, 8), grid=True, longest=True, device="cuda", dtype=torch.float16,
             add_max_batch=True, seed=0, log=print, checkpoint=None, decode_kernel="auto") -> dict:
    """``--grid`` and/or ``--longest`` (see the module doc); returns the results dict.
    ``checkpoint(res)`` is called after every model and sweep (the CLI writes the JSON there).
    ``decode_kernel``: the MustafarCaches' ``MustafarConfig.decode_kernel`` (``"auto"`` or a CUDA kernel)."""
    import mustafar

    budget = check_budget(kv_budget_gib * GIB)
    pairs = parse_ratios(ratios)
    kinds = cache_kinds(dense_caches, sparsities)
    margin = steps + PROFILED_STEPS + 8
    geos = {m: kv_geometry(_model_config(m), dtype) for m in models}
    plans = {m: plan_grid(geos[m], kinds, pairs, batches, budget, margin, midpoint, add_max_batch)
             if grid else {"sweeps": [], "skipped": []} for m in models}
    n_meas = sum(len(sw["contexts"]) for p in plans.values() for sw in p["sweeps"])
    n_cyc = sum(sw["cycle"] for p in plans.values() for sw in p["sweeps"])
    est = estimate_seconds(plans, geos, steps, n_longest=len(kinds) if longest else 0)
    log(f"plan: {len(models)} model(s), {sum(len(p['sweeps']) for p in plans.values())} sweeps, {n_meas} measured "
        f"contexts, {n_cyc} window cycles{', longest context for ' + str(len(kinds)) + ' caches' if longest else ''}; "
        f"estimated H200 wall time ~{est:.0f} s")
    res = {"grid": [], "window_cycles": [], "derived": [], "best": [], "linearity": {}, "cycle_fit": [],
           "longest": [], "plan": {m: {"sweeps": p["sweeps"], "skipped_batches": p["skipped"], "geometry": geos[m]}
                                   for m, p in plans.items()},
           "estimate_s": est, "complete": False,
           "settings": {"models": list(models), "ratios": [f"{p}:{g}" for p, g in pairs], "sparsities": list(sparsities),
                        "dense_caches": list(dense_caches), "grid_batches": list(batches),
                        "kv_budget_gib": kv_budget_gib, "steps": steps, "profiled_steps": PROFILED_STEPS,
                        "midpoint": list(midpoint) if midpoint else None, "device": str(device),
                        "dtype": str(dtype).replace("torch.", ""), "add_max_batch": add_max_batch, "seed": seed,
                        "decode_kernel": decode_kernel},
           "method": GRID_METHOD.format(steps=steps)}
    t_start = time.perf_counter()
    prog = _Progress(n_meas, log)
    dev = torch.device(device)
    chunk = geos[models[0]]["compress_chunk"]

    def save():
        res.update(derive([r for r in res["grid"] if r.get("context") is not None and not r.get("error")],
                          res["window_cycles"], pairs, chunk=chunk, midpoint=midpoint))
        res["wall_s"] = time.perf_counter() - t_start
        res["kernel_time_source"] = steps_mod.kineto_source()
        if checkpoint is not None:
            checkpoint(res)

    def load(name):
        free(dev)
        model, _ = mustafar.load_model(name, dtype=dtype, device=device)
        free(dev)
        base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        res.setdefault("weights_gib", {})[name] = base / GIB if dev.type == "cuda" else None
        return model, base

    # the grids of every model first, then the longest contexts (far longer than the kernels' other
    # tests: a failure there must not cost the grid)
    for name in (models if grid else ()):
        model, base = load(name)
        with torch.inference_mode():  # every cache tensor is made and written in inference mode
            for sw in plans[name]["sweeps"]:
                _run_sweep(model, name, sw, geos[name], steps, base, log, prog, seed, res["grid"],
                           res["window_cycles"], decode_kernel)
                save()
        del model
        free(dev)
    for name in (models if longest else ()):
        model, base = load(name)
        with torch.inference_mode():
            res["longest"] += _run_longest(model, name, geos[name], kinds, budget, steps, base, log, seed, decode_kernel)
        save()
        del model
        free(dev)
    save()
    for e in res["best"]:
        if e["cache"] == "compressed":
            ratios_txt = ", ".join(f"{k} {e[k]:.2f}x" for k in sorted(e) if "_over_" in k and e[k] is not None)
            log(f"{e['model']} {e['prompt']}:{e['gen']} s={e['sparsity']}: best {e['best_tok_per_s']:.0f} tok/s "
                f"(B={e['best_batch']}); {ratios_txt}")
    for mrow in res["linearity"].get("midpoint", []):
        log(f"linearity {mrow['model']} {mrow['cache']} s={mrow['sparsity']} B={mrow['batch']} ctx={mrow['context']}: "
            f"interpolated {mrow['interpolated_ms']:.3f} ms vs measured {mrow['measured_ms']:.3f} ms "
            f"({mrow['rel_error'] * 100:+.1f} %)")
    res["complete"] = True
    res["wall_s"] = time.perf_counter() - t_start
    log(f"grid done in {res['wall_s']:.0f} s (estimate was {est:.0f} s)")
    return res




def add_arguments(ap: argparse.ArgumentParser, shared: bool = True) -> None:
    """The grid's options on ``ap``: with ``shared``, also those the e2e generate benchmark has too
    (``--models``, ``--sparsities``, ``--kv-budget-gib``, ``--dense-caches``, ``--decode-kernel``,
    ``--out``); ``python -m mustafar.bench e2e`` adds those itself and passes ``shared=False``."""
    if shared:
        ap.add_argument("--models", nargs="+", default=["llama2-7b", "llama3-8b"])
        ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
        ap.add_argument("--kv-budget-gib", type=float, default=40.0)
        ap.add_argument("--dense-caches", nargs="+", default=["dense"], choices=["dense", "static"],
                        help="dense baselines: dense = DynamicCache (grows by torch.cat), static = transformers "
                             "StaticCache (preallocated)")
        ap.add_argument("--decode-kernel", default="auto", choices=DECODE_KERNELS,
                        help="the MustafarCaches' decode kernel (MustafarConfig.decode_kernel; CUDA names)")
        ap.add_argument("--out", default=None, help="output JSON (default results/e2e_grid_h200.json)")
    g = ap.add_argument_group("grid / longest context (random-K/V fill, no prefill; see mustafar.bench.e2e_grid)")
    g.add_argument("--grid", action="store_true", help="tokens/s grid: contexts x caches x batches under the budget")
    g.add_argument("--longest", action="store_true", help="longest context that fits the KV budget at batch 1")
    g.add_argument("--ratios", nargs="+", default=list(DEFAULT_RATIOS), metavar="P:G",
                   help="prompt:generated pairs (default %(default)s)")
    g.add_argument("--grid-batches", nargs="+", type=int, default=list(DEFAULT_GRID_BATCHES),
                   help="batches of the grid (those that fit the budget), plus the largest that fits "
                        "(default %(default)s)")
    g.add_argument("--no-max-batch", action="store_true", help="do not add the largest batch that fits")
    g.add_argument("--steps", type=int, default=5, help="wall-clock-timed decode steps per context (default 5)")
    g.add_argument("--midpoint", default="4096:1024:8", metavar="P:G:B",
                   help="also measure context P+G/2 at batch B to check the linear interpolation ('none': skip)")
    g.add_argument("--device", default="cuda", help="device of the grid/longest runs (cpu: smoke tests only)")
    g.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--estimate-only", action="store_true", help="print the grid plan and its time estimate, run nothing")


def main(argv: list[str] | None = None) -> int:
    """``python -m mustafar.bench e2e-grid [options]``: the grid and/or the longest context (both when
    neither ``--grid`` nor ``--longest`` is given)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    if not (args.grid or args.longest):
        args.grid = args.longest = True
    return run_args(args, command_line("e2e-grid", argv))


def run_args(args: argparse.Namespace, command: str) -> int:
    """Run the grid from parsed options (:func:`add_arguments`); writes ``args.out`` (default
    ``results/e2e_grid_h200.json``) after every sweep. Returns the exit status (2: bad options)."""
    def fail(msg: str) -> int:
        print(f"{PROG}: {msg}", file=sys.stderr)
        return 2

    if args.kv_budget_gib <= 0:
        return fail(f"--kv-budget-gib must be > 0, got {args.kv_budget_gib}")
    if args.steps < 1:
        return fail(f"--steps must be >= 1, got {args.steps}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available() and not args.estimate_only:
        return fail("needs a CUDA GPU (or --device cpu for a smoke run)")
    midpoint = None
    if str(args.midpoint).lower() != "none":
        try:
            midpoint = tuple(int(x) for x in args.midpoint.split(":"))
        except ValueError:
            midpoint = ()
        if len(midpoint) != 3 or min(midpoint) < 1:
            return fail(f"--midpoint must be P:G:B or none, got {args.midpoint!r}")
    try:
        pairs = parse_ratios(args.ratios)
    except ValueError as exc:
        return fail(str(exc))
    dtype = getattr(torch, args.dtype)

    def log(*a):
        print(*a, flush=True)

    if args.estimate_only:
        margin = args.steps + PROFILED_STEPS + 8
        kinds = cache_kinds(args.dense_caches, args.sparsities)
        geos = {m: kv_geometry(_model_config(m), dtype) for m in args.models}
        plans = {m: plan_grid(geos[m], kinds, pairs, args.grid_batches, args.kv_budget_gib * GIB,
                              margin, midpoint, not args.no_max_batch) for m in args.models}
        for m, p in plans.items():
            for sw in p["sweeps"]:
                log(f"{m} {sw['kind']} s={sw['sparsity']} B={sw['batch']}: contexts {sw['contexts']}"
                    + (" + window cycle" if sw["cycle"] else ""))
        est = estimate_seconds(plans, geos, args.steps, n_longest=len(kinds))
        log(f"{sum(len(sw['contexts']) for p in plans.values() for sw in p['sweeps'])} measured contexts; "
            f"estimated H200 wall time ~{est:.0f} s (grid + longest)")
        return 0

    out_path = args.out or default_out("e2e_grid_h200.json")
    prov = provenance(command)

    def checkpoint(res):
        res["sdpa_backends"] = SDPA_BACKENDS_NOTE
        write_results(out_path, res, prov=prov)

    with sdpa_backends():
        res = run_grid(args.models, args.ratios, args.sparsities, args.dense_caches, args.grid_batches,
                       args.kv_budget_gib, args.steps, midpoint, grid=args.grid, longest=args.longest,
                       device=args.device, dtype=dtype, add_max_batch=not args.no_max_batch, seed=args.seed,
                       log=log, checkpoint=checkpoint, decode_kernel=args.decode_kernel)
    checkpoint(res)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
