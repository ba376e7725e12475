"""End-to-end generation **wall clock**: eager and compiled caches side by side (issue #16).

``python -m mustafar.bench wallclock [--models smollm2-135m] [--dtypes float32] [--device cpu]
[--shapes 256:64] [--batches 1] [--sparsities 0.7] [--variants ...] [--reps 3] [--warmup 1]
[--decode-kernel auto] [--kv-budget-gib 40] [--resume] [--out PATH]``

What a user observes: greedy generation of exactly ``N`` new tokens after a ``P``-token prompt, timed
with ``time.perf_counter`` around the whole call (``torch.cuda.synchronize`` before and after on a GPU),
prefill and decode separated (a synchronised split after the first token). Not GPU-busy time.

Variants (``--variants``; every one runs greedy, fixed length, no EOS):

* ``dynamic``: eager :func:`mustafar.generate.generate` on a transformers ``DynamicCache``.
* ``static``: the same on a ``StaticCache`` (eager; shows what compiling buys).
* ``static-compiled``: :func:`mustafar.generate.generate` on a ``StaticCache`` with the decode step
  compiled (``--compile-mode``, default ``reduce-overhead`` = CUDA graphs on CUDA, ``default`` on the
  CPU); one cache per cell, ``reset()`` between calls (static addresses kept, as gpt-fast does).
* ``hf-static-compiled``: transformers' own fast path, what a user who knows transformers types:
  ``model.generate(..., cache_implementation="static", compile_config=CompileConfig(mode=...))``
  (transformers compiles ``forward`` for the decode steps; on the CPU it only compiles when the
  private ``CompileConfig._compile_all_devices`` is set, which this benchmark sets there). Prefill
  time is taken at the first generated token (a streamer that synchronises once).
* ``mustafar``: eager :func:`mustafar.generate.generate` on a compressed :class:`mustafar.MustafarCache`
  (``max_cache_len = P + N``) at each ``--sparsities`` (``MustafarConfig(decode_kernel=--decode-kernel)``).
* ``mustafar-compiled``: the same with the decode step compiled (the compileable layer of
  :mod:`mustafar.cache.static`: ``MustafarCache(..., max_cache_len=P + N)`` with per-token magnitude
  pruning); one cache per cell, ``reset()`` between calls, as ``static-compiled``. A configuration that
  cannot be compiled records :func:`mustafar.generate.check_compileable`'s message instead of a time
  (no silent eager fallback).
* ``mustafar-fp8-compiled``: ``mustafar-compiled`` with e4m3 stored values (+ a float16 scale per token
  vector) on both sides.

Protocol per cell (model, dtype, P:N, batch): every variant is called ``--warmup`` times (the first call
is recorded as ``first_call_s``: it includes compilation / CUDA-graph capture), then ``--reps`` rounds in
which every variant runs once, interleaved (so drift on a shared machine hits all alike). Reported:
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
                                   set_threads, sync, write_results)

__all__ = ["VARIANTS", "main", "run", "run_cell"]

VARIANTS = ("dynamic", "static", "static-compiled", "hf-static-compiled", "mustafar", "mustafar-compiled",
            "mustafar-fp8-compiled")
COMPILED_BASELINES = ("static-compiled", "hf-static-compiled")


def _use_sdpa(model) -> None:
    """A MustafarCache switched the model to the ``"mustafar"`` attention; dense variants run plain sdpa."""
    if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        model.set_attn_implementation("sdpa")


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


def _runners(model, ids, n, sparsities, variants, compile_mode, kernel, device):
    """``{label: (variant, sparsity, fn)}``; ``fn()`` -> ``(tokens [B, N], prefill_s, decode_s, total_s, cache)``;
    labels whose variant cannot run map to an error string instead of a tuple."""
    from mustafar.generate import check_compileable, generate

    b, p = ids.shape
    max_len = p + n
    out = {}

    def ours(kind, s, compile=None, cache_box=None):
        def fn():
            if cache_box is not None:  # one preallocated cache per cell, reset: the compiled graph keeps its addresses
                if "cache" in cache_box:
                    if kind.startswith("compressed"):
                        from mustafar.cache.attention import prepare_model
                        prepare_model(model)  # a dense variant in between switched the model back to sdpa
                    else:
                        _use_sdpa(model)
                    cache_box["cache"].reset()
                else:
                    cache_box["cache"] = make_cache(kind, model, s, max_len, kernel)
                cache = cache_box["cache"]
            else:
                cache = make_cache(kind, model, s, max_len, kernel)
            st = {}
            sync(device)
            t0 = time.perf_counter()
            seq = generate(model, ids, cache, n, compile=compile, stats=st)
            sync(device)
            return seq[:, p:], st["prefill_s"], st["decode_s"], time.perf_counter() - t0, cache
        return fn

    def hf_static():
        from transformers import CompileConfig

        cc = CompileConfig(mode=compile_mode)
        if torch.device(device).type == "cpu":
            cc._compile_all_devices = True  # transformers compiles only on accelerators unless this is set

        def fn():
            _use_sdpa(model)
            clock = _FirstTokenClock(device)
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True,
                                     cache_implementation="static", compile_config=cc, streamer=clock)
            sync(device)
            t = time.perf_counter() - t0
            pre = clock.t_first - t0
            return seq[:, p:], pre, t - pre, t, None
        return fn

    for v in variants:
        if v == "dynamic":
            out["dynamic"] = (v, None, ours("dense", 0.0))
        elif v == "static":
            out["static"] = (v, None, ours("static", 0.0, cache_box={}))
        elif v == "static-compiled":
            out["static-compiled"] = (v, None, ours("static", 0.0, compile_mode, cache_box={}))
        elif v == "hf-static-compiled":
            out["hf-static-compiled"] = (v, None, hf_static())
        elif v in ("mustafar", "mustafar-compiled", "mustafar-fp8-compiled"):
            kind = "compressed-fp8" if "fp8" in v else "compressed"
            compiled = v.endswith("-compiled")
            for s in sparsities:
                label = f"{v}@{s:g}"
                if compiled:
                    try:
                        check_compileable(make_cache(kind, model, s, max_len, kernel))
                    except ValueError as exc:
                        out[label] = str(exc)
                        continue
                out[label] = (v, s, ours(kind, s, compile_mode if compiled else None,
                                         cache_box={} if compiled else None))
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
             compile_mode=None, kernel="auto", seed=0, log=print) -> dict:
    """One (model, P:N, batch) cell of the benchmark (see the module doc); returns its result dict."""
    dev = next(model.parameters()).device
    if compile_mode is None:
        compile_mode = "reduce-overhead" if dev.type == "cuda" else "default"
    g = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=dev, generator=g)
    runners = _runners(model, ids, new, sparsities, variants, compile_mode, kernel, dev)
    rows, tokens, samples = {}, {}, {}
    for label, r in runners.items():
        if isinstance(r, str):
            rows[label] = {"variant": label.split("@")[0], "error": r}
            log(f"  {label}: not run: {r}")
            continue
        variant, s, fn = r
        rows[label] = {"variant": variant, "sparsity": s}
        try:
            skips0 = _cudagraph_skips()
            for i in range(max(1, warmup)):
                t0 = time.perf_counter()
                tok, *_ = fn()
                if i == 0:
                    rows[label]["first_call_s"] = time.perf_counter() - t0
            rows[label]["cudagraph_skips"] = _cudagraph_skips() - skips0
            tokens[label] = tok
            samples[label] = []
            log(f"  {label}: first call {rows[label]['first_call_s']:.2f} s")
        except Exception as exc:  # noqa: BLE001  (an OOM or a variant that cannot run: recorded, the rest go on)
            rows[label]["error"] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"  {label}: failed: {rows[label]['error']}")
            free(dev)
    graphs0 = _graphs()
    peaks = {}
    for _ in range(reps):
        for label in list(samples):
            mem_reset(dev)
            base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
            try:
                _, pre, dec, tot, cache = runners[label][2]()
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                rows[label]["error"] = f"{type(exc).__name__}: {exc}"[:500]
                del samples[label]
                free(dev)
                continue
            samples[label].append((pre, dec, tot))
            peaks[label] = mem_peak(dev, base)
            if cache is not None:
                rows[label]["cache_gib"] = cache_nbytes(cache) / GIB
            del cache
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
            "decode_kernel": kernel, "reps": reps, "warmup": warmup, "best_static_compiled": best,
            "graphs_compiled_during_timing": timing_graphs, "variants": rows}


def _key(cell) -> tuple:
    return (cell["model"], cell["dtype"], cell["prompt"], cell["new_tokens"], cell["batch"])


def run(models=("smollm2-135m",), dtypes=("float32",), device="cpu", shapes=((256, 64),), batches=(1,),
        sparsities=(0.7,), variants=VARIANTS, reps=3, warmup=1, compile_mode=None, kernel="auto",
        kv_budget_gib=40.0, out=None, command=None, resume=False, log=print) -> dict:
    """Every cell of models x dtypes x shapes x batches (see the module doc); writes ``out`` after each."""
    import mustafar

    res = {"cells": [], "skipped": [], "sdpa_backends": SDPA_BACKENDS_NOTE if device.startswith("cuda") else None,
           "timer": "wall clock: time.perf_counter, device synchronised around each phase"}
    done = set()
    if resume and out is not None and Path(out).is_file():
        old = json.loads(Path(out).read_text())
        res["cells"] = old.get("cells", [])
        done = {_key(c) for c in res["cells"]}
    prov = provenance(command)
    for name in models:
        for dt in dtypes:
            todo = [(p, n, b) for p, n in shapes for b in batches]
            model = None
            for p, n, b in todo:
                if (name, dt, p, n, b) in done:
                    log(f"{name} {dt} P={p} N={n} B={b}: in {out} already (--resume)")
                    continue
                if model is None:
                    model, _ = mustafar.load_model(name, dtype=getattr(torch, dt), device=device)
                n_layers, h_kv, d = kv_shape(model)
                kv = 2 * n_layers * b * h_kv * (p + n) * d * model.dtype.itemsize
                if kv > kv_budget_gib * GIB:
                    res["skipped"].append({"model": name, "dtype": dt, "prompt": p, "new_tokens": n, "batch": b,
                                           "why": f"dense KV {kv / GIB:.1f} GiB > --kv-budget-gib {kv_budget_gib}"})
                    continue
                log(f"{name} {dt} P={p} N={n} B={b} on {device}:")
                cell = run_cell(model, name, b, p, n, sparsities, variants, reps, warmup, compile_mode, kernel,
                                log=log)
                cell["dense_kv_gib"] = kv / GIB
                res["cells"].append(cell)
                if out is not None:
                    write_results(out, res, prov=prov)
            del model
            free(device)
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
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.7], help="MustafarCache K=V sparsities")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first (>= 1)")
    ap.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead"],
                    help="torch.compile mode of the compiled variants (default: reduce-overhead on CUDA, default on CPU)")
    ap.add_argument("--decode-kernel", default="auto", choices=DECODE_KERNELS,
                    help="MustafarConfig.decode_kernel of the MustafarCaches (CUDA names; CPU uses auto)")
    ap.add_argument("--kv-budget-gib", type=float, default=40.0, help="skip cells whose dense KV exceeds this")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--resume", action="store_true", help="keep the cells already in --out and skip them")
    ap.add_argument("--out", default=None, help="output JSON (default results/generate_compile_cpu.json on CPU, "
                                                 "results/e2e_wallclock_<gpu>.json on CUDA, e.g. _h100)")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 1:
        ap.error("--reps and --warmup must be >= 1")
    set_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("mustafar.bench wallclock: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    out = args.out or default_out(f"e2e_wallclock_{gpu_slug()}.json" if cuda else "generate_compile_cpu.json")
    kw = dict(models=args.models, dtypes=args.dtypes, device=args.device, shapes=args.shapes, batches=args.batches,
              sparsities=args.sparsities, variants=args.variants, reps=args.reps, warmup=args.warmup,
              compile_mode=args.compile_mode, kernel=args.decode_kernel, kv_budget_gib=args.kv_budget_gib, out=out,
              command=command_line("wallclock", argv), resume=args.resume)
    if cuda:
        with sdpa_backends():
            run(**kw)
    else:
        run(**kw)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
