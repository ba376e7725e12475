"""The e2e grid's arithmetic (pure, no model): cache bytes, the plan, the derivation of tokens/s.

* :func:`kv_geometry`, :func:`kv_bytes`, :func:`max_batch`, :func:`longest_context`: what a cache of
  each kind holds and what fits a KV budget.
* :func:`parse_ratios`, :func:`plan_grid`, :func:`estimate_seconds`: which caches to fill at which
  contexts, and roughly how long that takes on the H200.
* :func:`tokens_per_s`, :func:`derive`: decode tokens/s of (prompt, generated, batch) from the step
  times measured at the two ends of the generation (see :mod:`mustafar.bench.e2e_grid`).
"""

from __future__ import annotations

import math

import torch

from mustafar.bench.common import GIB, affine_fit, kv_shape

__all__ = ["DEFAULT_GRID_BATCHES", "DEFAULT_RATIOS", "PROFILED_STEPS", "cache_kinds", "check_budget", "derive",
           "estimate_seconds", "kv_bytes", "kv_geometry", "longest_context", "max_batch", "parse_ratios",
           "plan_grid", "row_step_ms", "tokens_per_s"]

PROFILED_STEPS = 3  # steps under torch.profiler per measurement (GPU-busy time)
DEFAULT_RATIOS = ("2048:1024", "4096:1024", "1024:4096", "2048:2048")
DEFAULT_GRID_BATCHES = (1, 8, 16, 32, 64, 128)


def kv_geometry(model_or_config, dtype: torch.dtype = torch.float16, mustafar_config=None) -> dict:
    """What the KV arithmetic needs: layers, KV heads, head_dim, element size, and the MustafarCache
    window schedule (``local_window``, ``compress_chunk``; default :class:`mustafar.MustafarConfig`)."""
    from mustafar import MustafarConfig

    layers, kv_heads, head_dim = kv_shape(model_or_config)
    mc = mustafar_config or MustafarConfig()
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
            "itemsize": torch.empty((), dtype=dtype).element_size(),
            "local_window": mc.local_window, "compress_chunk": mc.compress_chunk}


def kv_bytes(kind: str, s: float, geo: dict, batch: int, ctx: int) -> int:
    """Bytes the cache holds for ``batch`` sequences of ``ctx`` tokens.

    ``dense`` / ``static``: ``2 * layers * batch * kv_heads * ctx * head_dim * itemsize``.
    ``compressed`` (``compressed-fp8``: e4m3 stored values + a float16 scale per token vector on both sides):
    exactly what ``MustafarCache(max_cache_len=ctx).nbytes()`` holds (tests check it),
    i.e. ``layers`` times the cache's own per-layer account
    (:func:`mustafar.cache.preallocated_layer_nbytes`: bitmaps and kept values of the compressed rows,
    the dense K/V window at its capacity, the counter) at sparsity ``s`` for K and V and the window
    schedule of ``geo``. Unlike :func:`mustafar.bench.e2e.kv_fraction` this counts the window: at
    B=128 on Llama-2-7B it alone is 18 GiB."""
    from mustafar import MustafarConfig
    from mustafar.cache import preallocated_layer_nbytes

    L, H, D, it = geo["layers"], geo["kv_heads"], geo["head_dim"], geo["itemsize"]
    if kind in ("dense", "static"):
        return 2 * L * batch * H * ctx * D * it
    if kind not in ("compressed", "compressed-fp8"):
        raise ValueError(f"unknown cache kind {kind!r}")
    fp8 = dict(k_value_dtype="fp8_e4m3", v_value_dtype="fp8_e4m3") if kind == "compressed-fp8" else {}
    cfg = MustafarConfig(k_sparsity=s, v_sparsity=s, local_window=geo["local_window"],
                         compress_chunk=geo["compress_chunk"], **fp8)
    dtype = {2: torch.float16, 4: torch.float32}[it]  # only the element size enters the account
    return L * preallocated_layer_nbytes(cfg, int(batch), H, D, dtype, int(ctx))


def max_batch(kind: str, s: float, geo: dict, ctx: int, budget_bytes: float) -> int:
    """Largest batch whose :func:`kv_bytes` at ``ctx`` tokens fits ``budget_bytes`` (0 if none; ``ValueError`` for a
    budget that is not a positive number). Every layer of ``geo`` counts as a full-attention layer."""
    budget_bytes = check_budget(budget_bytes)
    fixed = kv_bytes(kind, s, geo, 0, ctx)
    per = kv_bytes(kind, s, geo, 1, ctx) - fixed
    return max(0, int((budget_bytes - fixed) // per))


def check_budget(budget_bytes) -> float:
    """``float(budget_bytes)``; ``ValueError`` unless it is a positive finite number."""
    try:
        b = float(budget_bytes)
    except (TypeError, ValueError):
        raise ValueError(f"KV budget {budget_bytes!r} is not a number") from None
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"KV budget must be a positive number of bytes, got {budget_bytes!r}")
    return b


def longest_context(kind: str, s: float, geo: dict, budget_bytes: float, batch: int = 1, multiple: int = 1024,
                    extra_tokens: int = 0) -> int:
    """Longest context, a multiple of ``multiple``, whose cache (sized for ``context + extra_tokens``:
    the decode steps run after filling it) fits ``budget_bytes`` at ``batch``; 0 when not even
    ``multiple`` tokens fit, found by a search over multiples (:func:`kv_bytes` grows with the context; dense:
    ``2 * layers * kv_heads * head_dim * itemsize`` per token; compressed: bitmaps + kept values of the store
    rows, plus the fixed dense window ring).

    Raises ``ValueError`` for a budget that is not a positive finite number, ``batch < 1``,
    ``multiple < 1`` or ``extra_tokens < 0``."""
    b = check_budget(budget_bytes)
    if int(batch) < 1 or int(multiple) < 1 or int(extra_tokens) < 0:
        raise ValueError(f"batch={batch} and multiple={multiple} must be >= 1, extra_tokens={extra_tokens} >= 0")
    m, extra = int(multiple), int(extra_tokens)

    def fits(n_mult: int) -> bool:  # kv_bytes grows with the context: a monotone search over multiples
        return kv_bytes(kind, s, geo, batch, n_mult * m + extra) <= b

    if not fits(1):
        return 0
    hi = 2
    while fits(hi):
        hi *= 2
    lo = hi // 2  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * m


def parse_ratios(ratios) -> list[tuple[int, int]]:
    """``["2048:1024", ...]`` -> ``[(2048, 1024), ...]`` (prompt, generated tokens; both >= 1)."""
    out = []
    for r in ratios:
        try:
            p, g = (int(x) for x in str(r).split(":"))
        except ValueError:
            raise ValueError(f"ratio {r!r} must be PROMPT:GEN, e.g. 2048:1024") from None
        if p < 1 or g < 1:
            raise ValueError(f"ratio {r!r}: prompt and generated tokens must be >= 1")
        out.append((p, g))
    return out


def cache_kinds(dense_caches, sparsities) -> list[tuple[str, float]]:
    """``[(dense kind, 0.0), ..., ("compressed", s), ...]``: the caches of a grid."""
    return [(c, 0.0) for c in dense_caches] + [("compressed", float(s)) for s in sparsities]


def plan_grid(geo: dict, kinds, pairs, batches, budget_bytes: float, margin: int = 0, midpoint=None,
              add_max_batch: bool = True, cycle_points: int = 3) -> dict:
    """Which caches to fill and at which contexts (pure; see the module doc).

    For every (prompt P, generated G) pair and cache kind, the batches of ``batches`` whose cache
    sized for ``P + G`` tokens (the generation's cache, :func:`kv_bytes`) fits ``budget_bytes`` (plus
    the largest batch that fits, with ``add_max_batch``) need the step time at contexts P and P + G.
    The measured caches hold ``margin`` more tokens (the decode steps run at the last context). ``dense`` and ``compressed`` caches
    are measured in one sweep per (kind, batch): one cache, extended context by context (ascending).
    ``static`` (StaticCache) reads its whole preallocated buffer at every step, so its step time is
    set by ``max_cache_len``: one cache per (batch, P + G), measured at P + G only.
    ``midpoint = (P, G, B)`` adds the context ``P + G // 2`` to the (dense and compressed) sweeps at
    batch B, to check the affine interpolation. Compressed sweeps at ``cycle_points`` batches (the
    smallest, the largest, and evenly in between) also measure the window cycle (full window,
    compressing step) at the start of the sweep.

    Returns ``{"sweeps": [{kind, sparsity, batch, contexts, max_len, cycle}], "skipped": [...]}``."""
    check_budget(budget_bytes)
    sweeps: dict[tuple, set] = {}
    skipped = []
    for p, g in pairs:
        for kind, s in kinds:
            bmax = max_batch(kind, s, geo, p + g, budget_bytes)
            bs = sorted({b for b in batches if b <= bmax} | ({bmax} if add_max_batch and bmax >= 1 else set()))
            for b in sorted(set(batches) - set(bs)):
                skipped.append({"kind": kind, "sparsity": s, "batch": b, "prompt": p, "gen": g,
                                "kv_gib": kv_bytes(kind, s, geo, b, p + g) / GIB})
            for b in bs:
                if kind == "static":
                    sweeps.setdefault((kind, s, b, p + g), set()).add(p + g)
                else:
                    sweeps.setdefault((kind, s, b, None), set()).update((p, p + g))
    if midpoint is not None:
        mp, mg, mb = midpoint
        for (kind, s, b, _), ctxs in sweeps.items():
            if kind != "static" and b == mb and {mp, mp + mg} <= ctxs:
                ctxs.add(mp + mg // 2)
    out = []
    order = {"dense": 0, "static": 1, "compressed": 2}
    for (kind, s, b, _), ctxs in sorted(sweeps.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2], kv[0][3] or 0)):
        c = sorted(ctxs)
        out.append({"kind": kind, "sparsity": s, "batch": b, "contexts": c, "max_len": c[-1] + margin,
                    "cycle": False})
    lw, chunk = geo["local_window"], geo["compress_chunk"]
    for s in sorted({sw["sparsity"] for sw in out if sw["kind"] == "compressed"}):
        cand = [sw for sw in out if sw["kind"] == "compressed" and sw["sparsity"] == s
                and sw["contexts"][0] >= _cycle_min_context(lw, chunk)]
        if not cand or cycle_points < 1:
            continue
        n, k = len(cand), min(cycle_points, len(cand))
        # one point: the largest batch (the extras grow with the batch: conservative for MustafarCache)
        idx = {n - 1} if k == 1 else {round(i * (n - 1) / (k - 1)) for i in range(k)}
        for i in idx:
            cand[i]["cycle"] = True
    return {"sweeps": out, "skipped": skipped}


def _cycle_min_context(lw: int, chunk: int) -> int:
    """Smallest first context of a sweep that can hold the window-cycle measurement before it."""
    return lw + 1 + (chunk - 1) + 5 + 8


def estimate_seconds(plans: dict, geos: dict, steps: int, step_ms: float = 45.0, profile_s: float = 0.3,
                     encode_ns: float = 5.0, update_us: float = 60.0, model_load_s: float = 8.0,
                     longest_s: float = 4.0, n_longest: int = 0, startup_s: float = 20.0) -> float:
    """Rough H200 wall time of a grid: per measurement ``steps + 3`` decode steps of ``step_ms``
    (HF's eager loop is CPU-bound: 25-60 ms per 7-8B step) plus ``profile_s`` of profiler start/stop
    and reading the kernel times (the raw kineto events: ~0.1-0.2 s; ``prof.events()`` would add
    ~1 s per session, see :func:`mustafar.bench.steps.kernel_us`); per compressed sweep the encode of its tokens
    (``encode_ns`` per token-head, the prune+encode rate of kernel_h200.json's comp256); per window
    cycle ``chunk`` single-token updates per layer (``update_us`` each) and 5 profiled steps in 3
    sessions; a model build each, ``n_longest`` longest-context runs per model, CUDA/CUPTI start-up."""
    total = startup_s
    for name, plan in plans.items():
        geo = geos[name]
        # the longest-context runs come after every grid: a second build of the model
        total += model_load_s * (1 + (n_longest > 0 and bool(plan["sweeps"]))) + n_longest * longest_s
        for sw in plan["sweeps"]:
            n = len(sw["contexts"])
            total += n * ((steps + PROFILED_STEPS) * step_ms / 1e3 + profile_s)
            if sw["kind"] == "compressed":
                rows = sw["batch"] * geo["kv_heads"] * geo["layers"] * sw["contexts"][-1]
                total += rows * encode_ns * 1e-9 * 1.5  # + the slow-path decode at each extension
            if sw["cycle"]:
                total += geo["compress_chunk"] * geo["layers"] * update_us * 1e-6 + 5 * step_ms / 1e3 + 3 * profile_s
    return total


def tokens_per_s(batch: int, gen: int, t_p_ms: float, t_pg_ms: float, window_extra_ms: float = 0.0,
                 compress_extra_ms: float = 0.0, chunk: int = 256, static: bool = False) -> float:
    """Decode tokens/s of ``batch`` sequences generating ``gen`` tokens after a P-token prompt, from
    the step times at contexts P (``t_p_ms``) and P + G (``t_pg_ms``).

    A decode step's time is affine in the context length (weights: constant; attention and the
    DynamicCache's re-copy: linear), so the G steps take ``G * (t(P) + t(P+G)) / 2`` and
    ``tokens/s = B * G / (G * (t(P) + t(P+G)) / 2)``. ``static``: StaticCache reads its whole
    ``max_cache_len = P + G`` buffer at every step, so every step takes ``t(P + G)``. MustafarCache
    adds ``window_extra_ms`` (its window holds ``local_window + chunk / 2`` dense rows on average, the
    measured steps ~``local_window``) and ``compress_extra_ms / chunk`` (one step in ``chunk``
    compresses ``chunk`` window tokens)."""
    if batch < 1 or gen < 1:
        raise ValueError(f"batch={batch} and gen={gen} must be >= 1")
    step = t_pg_ms if static else 0.5 * (t_p_ms + t_pg_ms)
    step += window_extra_ms + compress_extra_ms / chunk
    if not step > 0:
        raise ValueError(f"step time must be positive, got {step} ms")
    return batch * gen / (gen * step / 1e3)


def row_step_ms(row: dict) -> tuple[float | None, str]:
    """A measured row's step time and its source: GPU-busy where the profiler saw kernels, else the
    wall-clock median (CPU runs)."""
    if row.get("gpu_busy_ms"):
        return row["gpu_busy_ms"], "gpu_busy"
    return row.get("step_ms_median"), "wall_median"


def derive(grid_rows, cycle_rows, pairs, chunk: int = 256, midpoint=None) -> dict:
    """Tokens/s per (model, P, G, batch, cache) from the measured step times (pure).

    ``grid_rows``: measured rows ``{model, cache, sparsity, batch, context, gpu_busy_ms,
    step_ms_median, peak_mem_gib, cache_gib, kv_gib_planned?}``; ``cycle_rows``: window-cycle rows
    ``{model, sparsity, batch, full_ms, compress_ms, empty_ms}``. The cycle's two extras are affine
    in the batch and fitted per (model, sparsity) over the measured batches. Static rows are those of
    ``cache == "static"`` at context P + G. Returns ``{"derived", "best", "linearity", "cycle_fit"}``."""
    by = {}
    for r in grid_rows:
        by[(r["model"], r["cache"], r["sparsity"], r["batch"], r["context"])] = r
    fits = {}
    for key in sorted({(c["model"], c["sparsity"]) for c in cycle_rows}):
        cs = [c for c in cycle_rows if (c["model"], c["sparsity"]) == key]
        bs = [c["batch"] for c in cs]
        win = [0.5 * (c["full_ms"] - c["empty_ms"]) for c in cs]
        comp = [c["compress_ms"] - c["empty_ms"] for c in cs]
        fits[key] = {"batches": bs, "window_extra_ms": win, "compress_extra_ms": comp,
                     "window_fit": affine_fit(bs, win), "compress_fit": affine_fit(bs, comp),
                     "time_source": sorted({c["time_source"] for c in cs})}
    derived = []
    models = sorted({r["model"] for r in grid_rows})
    kinds = sorted({(r["cache"], r["sparsity"]) for r in grid_rows})
    for m in models:
        for p, g in pairs:
            for kind, s in kinds:
                for b in sorted({r["batch"] for r in grid_rows if (r["model"], r["cache"], r["sparsity"]) == (m, kind, s)}):
                    r_pg = by.get((m, kind, s, b, p + g))
                    r_p = r_pg if kind == "static" else by.get((m, kind, s, b, p))
                    if r_p is None or r_pg is None:
                        continue
                    (t_p, src_p), (t_pg, src_pg) = row_step_ms(r_p), row_step_ms(r_pg)
                    if t_p is None or t_pg is None:
                        continue
                    w = c = 0.0
                    fit = fits.get((m, s)) if kind == "compressed" else None
                    if fit is not None:
                        w = max(0.0, fit["window_fit"][0] + fit["window_fit"][1] * b)
                        c = max(0.0, fit["compress_fit"][0] + fit["compress_fit"][1] * b)
                    tps = tokens_per_s(b, g, t_p, t_pg, w, c, chunk, static=(kind == "static"))
                    kv = r_pg.get("kv_gib_planned")
                    alloc = r_pg.get("cache_gib")
                    peak = r_pg.get("peak_mem_gib")
                    derived.append({
                        "model": m, "prompt": p, "gen": g, "batch": b, "cache": kind, "sparsity": s,
                        "step_ms_at_P": t_p, "step_ms_at_P_plus_G": t_pg, "window_extra_ms": w,
                        "compress_extra_ms_per_token": c / chunk,
                        "step_ms_mean": (t_pg if kind == "static" else 0.5 * (t_p + t_pg)) + w + c / chunk,
                        "tok_per_s": tps, "time_source": src_p if src_p == src_pg else f"{src_p}/{src_pg}",
                        "cycle_measured": fit is not None if kind == "compressed" else None,
                        "kv_gib": kv, "peak_mem_gib_measured": peak, "cache_gib_allocated": alloc,
                        # the cache measured at P + G may be sized for a longer sweep: replace its
                        # allocated bytes by those of a cache sized for P + G
                        "peak_mem_gib": (peak - alloc + kv) if None not in (peak, alloc, kv) else None,
                    })
    best = []
    for m in models:
        for p, g in pairs:
            rows = [d for d in derived if (d["model"], d["prompt"], d["gen"]) == (m, p, g)]
            per_cache = {}
            for kind, s in kinds:
                rs = [d for d in rows if (d["cache"], d["sparsity"]) == (kind, s)]
                if not rs:
                    continue
                top = max(rs, key=lambda d: d["tok_per_s"])
                at8 = next((d for d in rs if d["batch"] == 8), None)
                per_cache[(kind, s)] = (top, at8)
                best.append({"model": m, "prompt": p, "gen": g, "cache": kind, "sparsity": s,
                             "best_tok_per_s": top["tok_per_s"], "best_batch": top["batch"],
                             "max_batch": max(d["batch"] for d in rs),
                             "peak_mem_gib_at_best": top["peak_mem_gib"], "kv_gib_at_best": top["kv_gib"],
                             "tok_per_s_at_batch_8": at8["tok_per_s"] if at8 else None})
            for e in best:
                if (e["model"], e["prompt"], e["gen"]) != (m, p, g) or e["cache"] != "compressed":
                    continue
                top, at8 = per_cache[("compressed", e["sparsity"])]
                for dk in ("dense", "static"):
                    if (dk, 0.0) not in per_cache:
                        continue
                    dtop, d8 = per_cache[(dk, 0.0)]
                    e[f"best_over_best_{dk}"] = top["tok_per_s"] / dtop["tok_per_s"]
                    e[f"at_batch_8_over_{dk}"] = (at8["tok_per_s"] / d8["tok_per_s"]) if (at8 and d8) else None
    linearity = {"midpoint": [], "fits": []}
    for (m, kind, s, b) in sorted({(r["model"], r["cache"], r["sparsity"], r["batch"]) for r in grid_rows}):
        rs = sorted((r for r in grid_rows if (r["model"], r["cache"], r["sparsity"], r["batch"]) == (m, kind, s, b)),
                    key=lambda r: r["context"])
        pts = [(r["context"], row_step_ms(r)[0]) for r in rs if row_step_ms(r)[0] is not None]
        if midpoint is not None and kind != "static" and b == midpoint[2]:
            mp, mg, _ = midpoint
            t = {c: v for c, v in pts}
            if {mp, mp + mg, mp + mg // 2} <= set(t):
                interp = 0.5 * (t[mp] + t[mp + mg])
                linearity["midpoint"].append({
                    "model": m, "cache": kind, "sparsity": s, "batch": b, "prompt": mp, "gen": mg,
                    "context": mp + mg // 2, "measured_ms": t[mp + mg // 2], "interpolated_ms": interp,
                    "rel_error": (interp - t[mp + mg // 2]) / t[mp + mg // 2]})
        if len(pts) >= 3:
            a, sl = affine_fit([c for c, _ in pts], [v for _, v in pts])
            res = [abs(v - (a + sl * c)) / v for c, v in pts]
            linearity["fits"].append({"model": m, "cache": kind, "sparsity": s, "batch": b,
                                      "contexts": [c for c, _ in pts], "intercept_ms": a, "ms_per_1k_tokens": sl * 1e3,
                                      "max_rel_residual": max(res)})
    cycle_fit = [{"model": m, "sparsity": s, **{k: v for k, v in f.items()}} for (m, s), f in fits.items()]
    return {"derived": derived, "best": best, "linearity": linearity, "cycle_fit": cycle_fit}


