"""End-to-end generation **wall clock**: eager and compiled caches side by side (issue #16).

``python -m mustafar.bench wallclock [--models smollm2-135m] [--dtypes float32] [--device cpu]
[--shapes 256:64] [--batches 1] [--sparsities 0.7] [--variants ...] [--reps 3] [--warmup 1]
[--decode-kernel auto [v6 ...]] [--kv-budget-gib 40] [--budget-batches] [--deadline-s S] [--resume] [--out PATH]``

What a user observes: greedy generation of exactly ``N`` new tokens after a ``P``-token prompt, timed
with ``time.perf_counter`` around the whole call (``torch.cuda.synchronize`` before and after on a GPU),
prefill and decode separated (a synchronised split after the first token). Not GPU-busy time.

Variants (``--variants``; every one runs greedy, fixed length, no EOS):

* ``dynamic``: eager :func:`mustafar.generate.generate` on a transformers ``DynamicCache``.
* ``static``: the same on a ``StaticCache`` (eager; shows what compiling buys).
* ``static-compiled``: :func:`mustafar.generate.generate` on a ``StaticCache`` with the decode step
  compiled (``--compile-mode``, default ``reduce-overhead`` = CUDA graphs on CUDA, ``default`` on the
  CPU); one cache per cell, ``reset()`` between calls (static addresses kept, as gpt-fast does). For a GQA
  model its attention packs the query heads of each KV head into one sdpa call (:mod:`mustafar.bench.gqa_sdpa`;
  transformers' compiled ``"sdpa"`` repeats K and V to every query head); ``static`` (eager) does the same.
* ``hf-static-compiled``: transformers' own fast path, what a user who knows transformers types:
  ``model.generate(..., cache_implementation="static", compile_config=CompileConfig(mode=...))``
  (transformers compiles ``forward`` for the decode steps; on the CPU it only compiles when the
  private ``CompileConfig._compile_all_devices`` is set, which this benchmark sets there). Prefill
  time is taken at the first generated token (a streamer that synchronises once).
* ``mustafar``: eager :func:`mustafar.generate.generate` on a compressed :class:`mustafar.MustafarCache`
  (``max_cache_len = P + N``) at each ``--sparsities`` (``MustafarConfig(decode_kernel=...)``: each of
  ``--decode-kernel``, default ``auto``; another kernel is labelled as a suffix, e.g. ``mustafar-compiled@0.7[v6]``).
* ``mustafar-compiled``: the same with the decode step compiled (the compileable layer of
  :mod:`mustafar.cache.static`: ``MustafarCache(..., max_cache_len=P + N)`` with per-token magnitude
  pruning); one cache per cell, ``reset()`` between calls, as ``static-compiled``. A configuration that
  cannot be compiled records :func:`mustafar.generate.check_compileable`'s message instead of a time
  (no silent eager fallback).
* ``mustafar-fp8-compiled``: ``mustafar-compiled`` with e4m3 stored values (+ a float16 scale per token
  vector) on both sides.

Prefill: a prompt of ``B x P > --prefill-tokens`` tokens (default 32768) is run in pieces of
``--prefill-tokens // B`` prompt tokens (``prefill_chunk`` of :func:`mustafar.generate.generate`, recorded per cell),
which bounds the prefill's activation memory at the large batches of ``--budget-batches``; decode is unaffected.

Protocol per cell (model, dtype, P:N, batch): every variant is called ``--warmup`` times, generating
``--warmup-tokens`` new tokens (default N; the first call is recorded as ``first_call_s``: it includes
compilation / CUDA-graph capture), then ``--reps`` rounds in
which every variant runs once, interleaved (so drift on a shared machine hits all alike). With ``--deadline-s`` (a device
session's time limit) each cell gets an equal share of the time left and starts no round after its first that
would end past it (judged by its longest round so far): ``reps`` records the rounds run, ``reps_asked`` the
``--reps``; each round's decode tokens/s is also logged as it ends. A cell's first calls run even past its share, so
a cell starts only if the previous cell's first calls (scaled by the ratio of warm-up tokens) fit in the time left;
otherwise it is listed under ``skipped`` with the reason. Reported:
medians of total, prefill and decode seconds; ``decode_tok_per_s = B * (N - 1) / decode_s`` (the first new
token comes out of the prefill) and ``total_tok_per_s = B * N / total_s``; ratios of medians against the
compiled StaticCache variants measured in the same cell (``vs_static_compiled``, ``vs_hf_static_compiled``,
``vs_best_static_compiled``: against the faster of the two). ``tokens_equal_dynamic`` is the fraction of
generated tokens equal to the eager ``DynamicCache`` run's (random-weight models in fp16 can flip
near-tied greedy choices; fp32 compiled vs eager StaticCache is tested for equality in
``tests/test_generate.py``). ``cudagraph_skips`` (per variant) counts compiled graphs inductor ran without a CUDA graph during the
warm-up calls (0 for a step that replays as a graph). ``graphs_compiled_during_timing`` counts dynamo graphs compiled during
the timed rounds (0 means no recompilation was timed). GPU runs exclude the cuDNN SDPA backend
(:func:`mustafar.bench.common.sdpa_backends`), as ``mustafar.bench e2e`` does.

``--budget-batches`` adds, per model, dtype and shape, the cells that answer "what is the fastest generation under a
KV budget": each cache kind at the largest batch whose cache sized for ``P + N`` tokens fits ``--kv-budget-gib``
(:func:`mustafar.bench.e2e_plan.max_batch`: a StaticCache's bytes for the dense variants; exactly
``MustafarCache.nbytes()`` for each MustafarCache variant and sparsity, the FP8-valued one separately). Each such
cell runs only the variants of its cache kind (``budget_group``). ``best_under_budget`` then compares, over every
cell of that model / dtype / shape, the best compiled-static decode tokens/s with the best of each MustafarCache
variant (ratios of medians from different cells of the same run; the batch of each is recorded).

Results are rewritten after every cell (:func:`mustafar.bench.common.write_results`); ``--resume`` skips
cells already in ``--out``, so a long grid can be run as several commands of bounded length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mustafar.bench.common import (GIB, SDPA_BACKENDS_NOTE, cache_nbytes, command_line, default_out, free, gpu_slug,
                                   is_oom, kv_shape, make_cache, mem_peak, mem_reset, provenance, sdpa_backends,
                                   set_threads, sync, use_dense_attention, write_results)
from mustafar.bench.e2e_plan import kv_geometry, max_batch

__all__ = ["VARIANTS", "main", "run", "run_cell"]

VARIANTS = ("dynamic", "static", "static-compiled", "hf-static-compiled", "mustafar", "mustafar-compiled",
            "mustafar-fp8-compiled")
COMPILED_BASELINES = ("static-compiled", "hf-static-compiled")


class _FirstTokenClock:
    """A ``model.generate`` streamer: the wall-clock time at which the first generated token arrives."""

    def __init__(self, device):
        self.device, self.calls, self.t_first = device, 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # 1st put: the prompt; 2nd: the token the prefill produced
            sync(self.device)
            self.t_first = time.perf_counter()

    def end(self):
        pass


def prefill_chunk_for(batch: int, prompt: int, prefill_tokens: int | None) -> int | None:
    """Prompt tokens per prefill piece so that a piece holds at most ``prefill_tokens`` tokens over the batch
    (``None``: the whole prompt in one forward, also when it fits)."""
    if prefill_tokens is None or batch * prompt <= prefill_tokens:
        return None
    return max(1, prefill_tokens // batch)


def _runners(model, ids, n, sparsities, variants, compile_mode, kernels, device, prefill_chunk=None):
    """``{label: (variant, sparsity, fn, decode kernel)}``; ``fn(new=n)`` -> ``(tokens [B, new], prefill_s, decode_s,
    total_s, cache)``;
    labels whose variant cannot run map to an error string instead of a tuple."""
    from mustafar.generate import check_compileable, generate

    b, p = ids.shape
    max_len = p + n
    out = {}

    def ours(kind, s, compile=None, cache_box=None, kernel="auto"):
        def fn(new=n):
            if cache_box is not None:  # one preallocated cache per cell, reset: the compiled graph keeps its addresses
                if "cache" in cache_box:
                    if kind.startswith("compressed"):
                        from mustafar.cache.attention import prepare_model
                        prepare_model(model)  # a dense variant in between switched the model back to sdpa
                    else:
                        use_dense_attention(model, kind)
                    cache_box["cache"].reset()
                else:
                    cache_box["cache"] = make_cache(kind, model, s, max_len, kernel)
                cache = cache_box["cache"]
            else:
                cache = make_cache(kind, model, s, max_len, kernel)
            st = {}
            sync(device)
            t0 = time.perf_counter()
            seq = generate(model, ids, cache, new, compile=compile, stats=st, prefill_chunk=prefill_chunk)
            sync(device)
            return seq[:, p:], st["prefill_s"], st["decode_s"], time.perf_counter() - t0, cache
        return fn

    def hf_static():
        from transformers import CompileConfig

        cc = CompileConfig(mode=compile_mode)
        if torch.device(device).type == "cpu":
            cc._compile_all_devices = True  # transformers compiles only on accelerators unless this is set

        def fn(new=n):
            use_dense_attention(model, "dense")  # transformers' own "sdpa" (model.generate builds its StaticCache)
            clock = _FirstTokenClock(device)
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True,
                                     cache_implementation="static", compile_config=cc, streamer=clock)
            sync(device)
            t = time.perf_counter() - t0
            pre = clock.t_first - t0
            return seq[:, p:], pre, t - pre, t, None
        return fn

    for v in variants:
        if v == "dynamic":
            out["dynamic"] = (v, None, ours("dense", 0.0), None)
        elif v == "static":
            out["static"] = (v, None, ours("static", 0.0, cache_box={}), None)
        elif v == "static-compiled":
            out["static-compiled"] = (v, None, ours("static", 0.0, compile_mode, cache_box={}), None)
        elif v == "hf-static-compiled":
            out["hf-static-compiled"] = (v, None, hf_static(), None)
        elif v in ("mustafar", "mustafar-compiled", "mustafar-fp8-compiled"):
            kind = "compressed-fp8" if "fp8" in v else "compressed"
            compiled = v.endswith("-compiled")
            for s in sparsities:
                for kernel in kernels:  # "auto" unlabelled; another decode kernel as a suffix: mustafar@0.7[v6]
                    label = f"{v}@{s:g}" + ("" if kernel == "auto" else f"[{kernel}]")
                    if compiled:
                        try:
                            check_compileable(make_cache(kind, model, s, max_len, kernel))
                        except ValueError as exc:
                            out[label] = str(exc)
                            continue
                    out[label] = (v, s, ours(kind, s, compile_mode if compiled else None,
                                             cache_box={} if compiled else None, kernel=kernel), kernel)
        else:
            raise ValueError(f"unknown variant {v!r}; known: {VARIANTS}")
    return out


def _cudagraph_skips() -> int:
    """Compiled graphs inductor ran without a CUDA graph (e.g. "skipping cudagraphs due to mutated inputs");
    a compiled variant on CUDA in ``reduce-overhead`` mode should add none."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_cell(model, name, batch, prompt, new, sparsities=(0.7,), variants=VARIANTS, reps=3, warmup=1,
             compile_mode=None, kernel="auto", seed=0, log=print, prefill_tokens=32768, warmup_tokens=None,
             deadline=None) -> dict:
    """One (model, P:N, batch) cell of the benchmark (see the module doc); returns its result dict. ``deadline``
    (a ``time.perf_counter`` value): after the first round, a round that would end past it (judged by the
    longest round so far) is not started; the cell records the rounds it ran (``reps``)."""
    dev = next(model.parameters()).device
    if compile_mode is None:
        compile_mode = "reduce-overhead" if dev.type == "cuda" else "default"
    g = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=dev, generator=g)
    chunk = prefill_chunk_for(batch, prompt, prefill_tokens)
    kernels = (kernel,) if isinstance(kernel, str) else tuple(kernel)
    runners = _runners(model, ids, new, sparsities, variants, compile_mode, kernels, dev, chunk)
    rows, tokens, samples = {}, {}, {}
    for label, r in runners.items():
        if isinstance(r, str):
            rows[label] = {"variant": label.split("@")[0], "error": r}
            log(f"  {label}: not run: {r}")
            continue
        variant, s, fn, kern = r
        rows[label] = {"variant": variant, "sparsity": s}
        if kern is not None:
            rows[label]["decode_kernel"] = kern
        try:
            skips0 = _cudagraph_skips()
            for i in range(max(1, warmup)):
                t0 = time.perf_counter()
                fn(min(new, warmup_tokens or new))
                if i == 0:
                    rows[label]["first_call_s"] = time.perf_counter() - t0
            rows[label]["cudagraph_skips"] = _cudagraph_skips() - skips0
            samples[label] = []
            log(f"  {label}: first call {rows[label]['first_call_s']:.2f} s")
        except Exception as exc:  # noqa: BLE001  (an OOM or a variant that cannot run: recorded, the rest go on)
            rows[label]["error"] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"  {label}: failed: {rows[label]['error']}")
            free(dev)
    graphs0 = _graphs()
    peaks = {}
    longest = 0.0
    for rep in range(reps):
        if rep > 0 and deadline is not None and time.perf_counter() + longest > deadline:
            log(f"  rounds stopped after {rep} of {reps}: the next would end past the deadline")
            break
        t_round = time.perf_counter()
        for label in list(samples):
            mem_reset(dev)
            base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
            try:
                tok, pre, dec, tot, cache = runners[label][2]()
                tokens.setdefault(label, tok)
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                rows[label]["error"] = f"{type(exc).__name__}: {exc}"[:500]
                del samples[label]
                free(dev)
                continue
            samples[label].append((pre, dec, tot))
            log(f"  {label} round {rep + 1}: prefill {pre:.3f} s  decode {batch * (new - 1) / dec:.1f} tok/s")
            peaks[label] = mem_peak(dev, base)
            if cache is not None:
                rows[label]["cache_gib"] = cache_nbytes(cache) / GIB
            del cache
        longest = max(longest, time.perf_counter() - t_round)
    timing_graphs = _graphs() - graphs0
    ref = tokens.get("dynamic")
    for label, ss in samples.items():
        if not ss:
            continue
        pre, dec, tot = (statistics.median(x) for x in zip(*ss))
        rows[label].update(prefill_s=pre, decode_s=dec, total_s=tot, reps=len(ss),
                           decode_tok_per_s=batch * (new - 1) / dec if new > 1 else None,
                           total_tok_per_s=batch * new / tot, peak_mem_gib=peaks.get(label),
                           samples_total_s=[x[2] for x in ss])
        if ref is not None:
            rows[label]["tokens_equal_dynamic"] = float((tokens[label] == ref).float().mean())
    base = {k: rows[k] for k in COMPILED_BASELINES if "decode_s" in rows.get(k, {})}
    best = min(base, key=lambda k: rows[k]["total_s"]) if base else None
    for label, row in rows.items():
        if "decode_s" not in row:
            continue
        for key, ref_label in [("vs_static_compiled", "static-compiled"), ("vs_hf_static_compiled",
                                                                           "hf-static-compiled"),
                               ("vs_best_static_compiled", best)]:
            if ref_label in base:
                row[key] = {"decode_tok_per_s": row["decode_s"] and base[ref_label]["decode_s"] / row["decode_s"],
                            "total": base[ref_label]["total_s"] / row["total_s"]}
        log(f"  {label:24s} total {row['total_s']:7.3f} s  prefill {row['prefill_s']:6.3f} s  decode "
            f"{row['decode_tok_per_s'] or float('nan'):8.1f} tok/s"
            + (f"  x{row['vs_best_static_compiled']['decode_tok_per_s']:.2f} vs best compiled static (decode)"
               if "vs_best_static_compiled" in row else ""))
    return {"model": name, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(dev),
            "batch": batch, "prompt": prompt, "new_tokens": new, "compile_mode": compile_mode,
            "decode_kernels": list(kernels), "reps": max((len(x) for x in samples.values()), default=0),
            "reps_asked": reps, "warmup": warmup, "best_static_compiled": best,
            "prefill_chunk": chunk, "warmup_tokens": min(new, warmup_tokens or new),
            "graphs_compiled_during_timing": timing_graphs, "variants": rows}


def _key(cell) -> tuple:
    return (cell["model"], cell["dtype"], cell["prompt"], cell["new_tokens"], cell["batch"], cell.get("budget_group"))


DENSE_VARIANTS = ("dynamic", "static", "static-compiled", "hf-static-compiled")


def budget_groups(model, variants, sparsities, max_len: int, budget_bytes: float) -> list:
    """``[(group, variants, sparsities, batch)]``: per cache kind among ``variants``, the largest batch whose cache
    sized for ``max_len`` tokens fits ``budget_bytes`` (:func:`mustafar.bench.e2e_plan.max_batch`); groups where
    not even batch 1 fits are left out. ``group`` is ``"dense"``, ``"mustafar@s"`` or ``"mustafar-fp8@s"``."""
    geo = kv_geometry(model, next(model.parameters()).dtype)  # the default MustafarConfig window, as make_cache's
    out = []
    dense = [v for v in variants if v in DENSE_VARIANTS]
    if dense:
        out.append(("dense", dense, (), max_batch("static", 0.0, geo, max_len, budget_bytes)))
    for s in sparsities:
        for group, kind, names in [("mustafar", "compressed", ("mustafar", "mustafar-compiled")),
                                   ("mustafar-fp8", "compressed-fp8", ("mustafar-fp8-compiled",))]:
            vs = [v for v in variants if v in names]
            if vs:
                out.append((f"{group}@{s:g}", vs, (s,), max_batch(kind, s, geo, max_len, budget_bytes)))
    return [g for g in out if g[3] >= 1]


def best_under_budget(cells: list, budget_gib: float) -> list:
    """Per (model, dtype, prompt, new tokens): the best compiled-static decode tokens/s over the cells whose dense
    KV fits ``budget_gib`` (either compiled static variant), and for each MustafarCache variant its best over the
    cells whose own cache fits (its ``cache_gib``), with the ratio to the static best."""
    shapes = {}
    for c in cells:
        shapes.setdefault((c["model"], c["dtype"], c["prompt"], c["new_tokens"]), []).append(c)
    out = []
    for (m, dt, p, n), cs in shapes.items():
        best = {}
        for c in cs:
            for label, row in c["variants"].items():
                tps = row.get("decode_tok_per_s")
                if tps is None:
                    continue
                if row["variant"] in COMPILED_BASELINES:
                    if c.get("dense_kv_gib", float("inf")) > budget_gib:
                        continue
                    key = "static-compiled (best of both)"
                elif row["variant"].startswith("mustafar"):
                    if row.get("cache_gib", float("inf")) > budget_gib:
                        continue
                    key = label
                else:
                    continue
                if key not in best or tps > best[key]["decode_tok_per_s"]:
                    best[key] = {"label": label, "batch": c["batch"], "decode_tok_per_s": tps}
        ref = best.pop("static-compiled (best of both)", None)
        entry = {"model": m, "dtype": dt, "prompt": p, "new_tokens": n, "kv_budget_gib": budget_gib,
                 "best_static_compiled": ref, "mustafar": best}
        if ref is not None:
            for row in best.values():
                row["vs_best_static_compiled"] = row["decode_tok_per_s"] / ref["decode_tok_per_s"]
        out.append(entry)
    return out


def share(deadline, cells_left: int):
    """The deadline of the next of ``cells_left`` cells: an equal share of the time left before ``deadline``."""
    if deadline is None:
        return None
    now = time.perf_counter()
    return now + max(0.0, deadline - now) / max(1, cells_left)


def run(models=("smollm2-135m",), dtypes=("float32",), device="cpu", shapes=((256, 64),), batches=(1,),
        sparsities=(0.7,), variants=VARIANTS, reps=3, warmup=1, compile_mode=None, kernel="auto",
        kv_budget_gib=40.0, out=None, command=None, resume=False, budget_batches=False, prefill_tokens=32768,
        warmup_tokens=None, deadline_s=None, log=print) -> dict:
    """Every cell of models x dtypes x shapes x batches, plus with ``budget_batches`` the largest batch of each
    cache kind under the budget (see the module doc); writes ``out`` after each cell."""
    import mustafar
    from mustafar.generate import release_compiled

    res = {"cells": [], "skipped": [], "sdpa_backends": SDPA_BACKENDS_NOTE if device.startswith("cuda") else None,
           "timer": "wall clock: time.perf_counter, device synchronised around each phase"}
    done = set()
    if resume and out is not None and Path(out).is_file():
        old = json.loads(Path(out).read_text())
        res["cells"] = old.get("cells", [])
        done = {_key(c) for c in res["cells"]}
    prov = provenance(command)
    deadline = None if deadline_s is None else time.perf_counter() + deadline_s
    last_first = None  # (seconds of the last cell's first calls, its warm-up tokens)
    for name in models:
        for dt in dtypes:
            model, _ = mustafar.load_model(name, dtype=getattr(torch, dt), device=device)
            n_layers, h_kv, d = kv_shape(model)
            todo = [(p, n, b, None, variants, sparsities) for p, n in shapes for b in batches]
            if budget_batches:
                todo += [(p, n, b, g, vs, ss) for p, n in shapes
                         for g, vs, ss, b in budget_groups(model, variants, sparsities, p + n, kv_budget_gib * GIB)]
            for i, (p, n, b, group, vs, ss) in enumerate(todo):
                what = f"{name} {dt} P={p} N={n} B={b}" + (f" (largest batch under the budget: {group})" if group
                                                            else "")
                if (name, dt, p, n, b, group) in done:
                    log(f"{what}: in {out} already (--resume)")
                    continue
                def skip(why):
                    res["skipped"].append({"model": name, "dtype": dt, "prompt": p, "new_tokens": n, "batch": b,
                                           "why": why})

                kv = 2 * n_layers * b * h_kv * (p + n) * d * model.dtype.itemsize
                if group is None and kv > kv_budget_gib * GIB:
                    skip(f"dense KV {kv / GIB:.1f} GiB > --kv-budget-gib {kv_budget_gib}")
                    continue
                if deadline is not None and last_first is not None:
                    # the first calls (compile + a warm-up generation) run even past a share: start a cell only
                    # if the last cell's first calls, scaled by the warm-up tokens, fit in the time left
                    need = last_first[0] * max(1.0, (warmup_tokens or n) / last_first[1])
                    left = deadline - time.perf_counter()
                    if need > left:
                        log(f"{what}: skipped: {left:.0f} s left before the deadline, its first calls need ~{need:.0f} s")
                        skip(f"deadline: {left:.0f} s left, first calls ~{need:.0f} s")
                        continue
                log(f"{what} on {device}:")
                cell = run_cell(model, name, b, p, n, ss, vs, reps, warmup, compile_mode, kernel, log=log,
                                prefill_tokens=prefill_tokens, warmup_tokens=warmup_tokens,
                                deadline=share(deadline, len(todo) - i))
                cell["dense_kv_gib"] = kv / GIB
                last_first = (sum(r.get("first_call_s", 0.0) for r in cell["variants"].values()), warmup_tokens or n)
                if group is not None:
                    cell["budget_group"] = group
                res["cells"].append(cell)
                release_compiled()  # the next batch compiles its own graphs: free this one's CUDA graph pools
                free(device)
                if budget_batches:
                    res["best_under_budget"] = best_under_budget(res["cells"], kv_budget_gib)
                if out is not None:
                    write_results(out, res, prov=prov)
            del model
            free(device)
    if budget_batches:
        for e in res.get("best_under_budget", []):
            ref = e["best_static_compiled"]
            log(f"best under {kv_budget_gib:g} GiB, {e['model']} {e['dtype']} {e['prompt']}:{e['new_tokens']}: "
                + (f"static compiled {ref['decode_tok_per_s']:.1f} tok/s at B={ref['batch']}" if ref else "no static")
                + "".join(f"; {k} {r['decode_tok_per_s']:.1f} at B={r['batch']}"
                          + (f" (x{r['vs_best_static_compiled']:.2f})" if "vs_best_static_compiled" in r else "")
                          for k, r in e["mustafar"].items()))
    return res


def _shape(text: str) -> tuple[int, int]:
    try:
        p, n = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PROMPT:NEW_TOKENS, e.g. 4096:1024") from None
    if p < 1 or n < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: need PROMPT >= 1 and NEW_TOKENS >= 2")
    return p, n


def main(argv: list[str] | None = None) -> int:
    from mustafar.ops.dispatch import DECODE_KERNELS

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m mustafar.bench wallclock", description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"],
                    help="mustafar.load_model names: smollm2-135m, presets such as llama2-7b / llama3-8b (random weights)")
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="+", type=_shape, default=[(256, 64)], metavar="P:N",
                    help="prompt:new-token pairs")
    ap.add_argument("--batches", nargs="*", type=int, default=[1],
                    help="batch sizes (none with --budget-batches: only the largest batch of each cache kind)")
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.7], help="MustafarCache K=V sparsities")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first (>= 1)")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="new tokens of each warm-up call (default: N; fewer suffice to compile and capture the step "
                         "and the window compression; graphs_compiled_during_timing shows if they did not)")
    ap.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead"],
                    help="torch.compile mode of the compiled variants (default: reduce-overhead on CUDA, default on CPU)")
    ap.add_argument("--decode-kernel", nargs="+", default=["auto"], choices=DECODE_KERNELS,
                    help="MustafarConfig.decode_kernel of the MustafarCaches (CUDA names; CPU uses auto); several: each "
                         "MustafarCache variant once per kernel, side by side (labels mustafar-compiled@0.7[v6], ...)")
    ap.add_argument("--kv-budget-gib", type=float, default=40.0, help="skip --batches cells whose dense KV exceeds this")
    ap.add_argument("--budget-batches", action="store_true",
                    help="also run each cache kind at its largest batch under --kv-budget-gib (best_under_budget)")
    ap.add_argument("--prefill-tokens", type=int, default=32768,
                    help="at most this many tokens (batch x piece) per prefill forward: longer prompts are prefilled in "
                         "pieces (mustafar.generate's prefill_chunk; not hf-static-compiled, which is model.generate)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="time for the whole run, in seconds from its start: each cell gets an equal share of what is "
                         "left and starts no timed round (after its first) that would end past its share; a cell "
                         "records the rounds it ran (reps; reps_asked = --reps)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--resume", action="store_true", help="keep the cells already in --out and skip them")
    ap.add_argument("--out", default=None, help="output JSON (default results/generate_compile_cpu.json on CPU, "
                                                 "results/e2e_wallclock_<gpu>.json on CUDA, e.g. _h100)")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 1:
        ap.error("--reps and --warmup must be >= 1")
    if any(x < 1 for x in args.batches):
        ap.error(f"--batches must be >= 1, got {args.batches}")
    if not args.batches and not args.budget_batches:
        ap.error("--batches needs at least one batch size unless --budget-batches is given")
    if args.warmup_tokens is not None and args.warmup_tokens < 2:
        ap.error(f"--warmup-tokens must be >= 2, got {args.warmup_tokens}")
    if args.prefill_tokens < 1:
        ap.error(f"--prefill-tokens must be >= 1, got {args.prefill_tokens}")
    if args.deadline_s is not None and not args.deadline_s > 0:
        ap.error(f"--deadline-s must be > 0, got {args.deadline_s}")
    if not args.kv_budget_gib > 0:
        ap.error(f"--kv-budget-gib must be > 0, got {args.kv_budget_gib}")
    set_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("mustafar.bench wallclock: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    out = args.out or default_out(f"e2e_wallclock_{gpu_slug()}.json" if cuda else "generate_compile_cpu.json")
    kw = dict(models=args.models, dtypes=args.dtypes, device=args.device, shapes=args.shapes, batches=args.batches,
              sparsities=args.sparsities, variants=args.variants, reps=args.reps, warmup=args.warmup,
              compile_mode=args.compile_mode, kernel=args.decode_kernel, kv_budget_gib=args.kv_budget_gib, out=out,
              command=command_line("wallclock", argv), resume=args.resume, budget_batches=args.budget_batches,
              prefill_tokens=args.prefill_tokens, warmup_tokens=args.warmup_tokens, deadline_s=args.deadline_s)
    if cuda:
        with sdpa_backends():
            run(**kw)
    else:
        run(**kw)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
