"""End-to-end decode throughput on a CUDA GPU: DynamicCache + SDPA vs MustafarCache (compressed).

``python -m mustafar.bench.e2e [--models llama2-7b llama3-8b] [--prompts 2048 4096] [--gen 1024]
[--batches 1 4 8 16] [--sparsities 0.5 0.7] [--kv-budget-gib 40] [--check-tokens 128]
[--out results/e2e_h200.json]``

Random-weight fp16 models of the Llama-2-7B / Llama-3-8B shapes (``mustafar.load_model`` presets:
no download). For every (model, prompt length, batch) whose dense KV cache fits the budget, it runs
``model.generate`` greedily with ``min_new_tokens = max_new_tokens = gen`` and reports prefill+decode
wall time, decode tokens/s (batch * generated tokens / decode time; decode time = total - the time
of a 1-token generate with the same prompt), peak GPU memory and the cache's bytes. With
``--check-tokens N`` it also generates N greedy tokens with ``mode="compressed"`` and
``mode="simulate"`` (same pruning schedule, dense attention) and reports how many leading tokens
agree, in each dtype of ``--check-dtypes`` (default fp32 and fp16; the model is rebuilt in that
dtype with the same seed). Random-weight models have near-flat next-token distributions, so in fp16
the rounding difference between the fused kernel and SDPA can flip a greedy choice; each check
therefore also records, at the first differing position, the simulate run's top-1 minus top-2 logit
margin and the largest logit difference between the two runs over the agreeing prefix (the
numerical noise level): a flip whose margin is within that noise is rounding, not a cache bug.
All runs exclude PyTorch's cuDNN SDPA backend (``sdpa_kernel`` with flash, memory-efficient and
math only): it builds a new cuDNN graph whenever the key length changes, i.e. at every decode step,
which costs ~1.2-1.8 ms of CPU per attention call (measured with ``--profile-steps`` on the H200:
~60 ms per step for a 32-layer model) and would make the dense baseline CPU-bound.
With ``--step-timing N`` it also times N single decode steps (``model(next_token, past_key_values=
cache)``, synchronised, median) after a prefill for dense and MustafarCache, at each batch of
``--step-batches`` whose KV estimate fits ``--kv-budget-gib``, and records the GPU-busy time per
step (the union of the kernels' time intervals over three steps under ``torch.profiler``): HF's
eager loop is CPU-bound on the H200 (25-60 ms of CPU per 7-8B step), so the GPU-busy time is the
comparison that a runtime without Python overhead would see. ``--dense-caches dense static`` adds transformers'
``StaticCache`` (preallocated) as a second dense baseline next to ``DynamicCache`` (which grows by
``torch.cat``, re-copying the cache every step). ``--gen 0`` skips the ``generate`` runs.

Grid and longest context (``--grid``, ``--longest``; they run instead of the modes above and write
``results/e2e_grid_h200.json`` by default)::

    python -m mustafar.bench.e2e --grid --longest [--models llama2-7b llama3-8b]
        [--ratios 2048:1024 4096:1024 1024:4096 2048:2048] [--sparsities 0.5 0.7] [--dense-caches dense]
        [--grid-batches 1 8 16 32 64 128] [--kv-budget-gib 40] [--steps 5] [--midpoint 4096:1024:8]

Running 1K+ real generate steps per configuration costs ~40 ms of CPU per eager 7-8B step, far
beyond the device time a full grid may take, so the grid measures decode *step* times and derives
tokens/s from them:

* No prefill: :func:`fill_cache` writes random K/V (N(0, 1), the model's dtype and KV shape) into
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
import json
import os
import sys
import time

import torch

__all__ = ["derive", "fill_cache", "kv_bytes", "longest_context", "main", "plan_grid", "run", "run_grid",
           "step_timing", "tokens_per_s"]


def _sdpa_backends():
    """Flash, memory-efficient and math SDPA backends (no cuDNN: see the module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _sync_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def _generate(model, ids, n_new, cache, **extra):
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, use_cache=True,
              pad_token_id=0, eos_token_id=None, **extra)
    if cache is not None:
        kw["past_key_values"] = cache
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def _make_cache(kind, model, s, max_len):
    import mustafar

    if kind == "dense":
        return None
    if kind == "static":  # dense, preallocated (no per-step torch.cat of the whole cache)
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=max_len)
    mode = "simulate" if kind == "simulate" else "compressed"
    return mustafar.MustafarCache(model, mustafar.MustafarConfig(k_sparsity=s, v_sparsity=s, mode=mode),
                                  max_cache_len=max_len)


def token_check(model, n_new: int, sparsity: float = 0.7, prompt: int = 600, batch: int = 2, seed: int = 0) -> dict:
    """Greedy tokens of ``mode="compressed"`` vs ``mode="simulate"`` on random prompts (see module doc)."""
    vocab, dev = model.config.vocab_size, next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt), device=dev, generator=g)
    outs, scores = {}, {}
    for kind in ("compressed", "simulate"):
        cache = _make_cache(kind, model, sparsity, prompt + n_new + 8)
        res = _generate(model, ids, n_new, cache, output_scores=True, return_dict_in_generate=True)
        outs[kind] = res.sequences[:, prompt:]
        scores[kind] = torch.stack([s.float() for s in res.scores], 1)  # [B, n_new, vocab]
    same = outs["compressed"] == outs["simulate"]
    agree = [int(same[i].cumprod(0).sum()) for i in range(same.shape[0])]
    first = []
    for i, j in enumerate(agree):
        if j >= n_new:
            first.append(None)
            continue
        top2 = scores["simulate"][i, j].topk(2).values
        noise = float((scores["compressed"][i, : j + 1] - scores["simulate"][i, : j + 1]).abs().max())
        first.append({"position": j, "simulate_top1_minus_top2": float(top2[0] - top2[1]),
                      "max_logit_diff_up_to_here": noise})
    return {"prompt": prompt, "batch": batch, "new_tokens": n_new, "sparsity": sparsity,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "leading_tokens_equal": agree, "fraction_equal": float(same.float().mean()), "first_difference": first}


_KINETO_FAST: bool | None = None  # whether the raw kineto event sum matched prof.events() (decided at first use)


def _busy_us(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals (any unit): time during which any of them runs."""
    total, cur_s, cur_e = 0.0, None, None
    for st, en in sorted(intervals):
        if cur_e is None or st > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = st, en
        else:
            cur_e = max(cur_e, en)
    return float(total + (cur_e - cur_s if cur_e is not None else 0.0))


def _kernel_us(prof) -> float:
    """GPU-busy time (us) of a finished ``torch.profiler`` session: the length of the union of the
    device (CUDA) events' time intervals, so that work overlapping in time counts once (the decode's
    merge kernel is launched as a programmatic dependent and runs, waiting, alongside the decode
    kernel; a plain sum of kernel durations counted that stretch twice).

    ``prof.events()`` builds the whole CPU/GPU event tree in Python (~0.5-1 s for three 32-layer
    decode steps); the same intervals are read straight from the raw kineto events when they agree with
    it. The first session that has device events computes both and keeps the fast path only if they
    agree within 0.5 %; otherwise (or if the private kineto API is missing) ``prof.events()`` is used."""
    global _KINETO_FAST
    from torch.autograd import DeviceType

    def slow():
        return _busy_us((e.time_range.start, e.time_range.end) for e in prof.events()
                        if e.device_type == DeviceType.CUDA)

    if _KINETO_FAST is False:
        return slow()
    try:
        from torch.autograd.profiler_util import _filter_name

        fast = _busy_us((e.start_ns(), e.start_ns() + e.duration_ns()) for e in prof.profiler.kineto_results.events()
                        if e.device_type() == DeviceType.CUDA and not _filter_name(e.name())
                        and not getattr(e, "is_hidden_event", lambda: False)()) / 1e3
    except Exception:  # noqa: BLE001  (private API of torch.profiler)
        _KINETO_FAST = False
        return slow()
    if _KINETO_FAST is None:
        ref = slow()
        if ref > 0:
            _KINETO_FAST = abs(fast - ref) <= 5e-3 * ref
            if not _KINETO_FAST:
                print(f"mustafar.bench.e2e: kineto busy time {fast:.1f} us != prof.events() {ref:.1f} us; using "
                      "prof.events() (~1 s more per profiled measurement)", file=sys.stderr, flush=True)
        return ref
    return fast


def _median(xs):
    """Upper median (the ``sorted[len // 2]`` of the original step timing); ``None`` for no values."""
    return sorted(xs)[len(xs) // 2] if xs else None


def _run_steps(model, cache, nxt, pos: int, steps: int, profile_steps: int = 3, profile_log=None,
               label: str = "") -> dict:
    """Greedy decode steps through the real model at positions ``pos, pos + 1, ...`` on ``cache``.

    ``steps`` steps are timed one by one (synchronised wall clock); then ``profile_steps`` more run
    under ``torch.profiler`` when the model is on CUDA (or ``profile_log`` is given): their GPU-busy
    time (union of the kernels' intervals, :func:`_kernel_us`) / ``profile_steps`` is ``gpu_busy_ms``
    (``None`` without device events, e.g. on CPU).
    ``profiled_wall_ms`` is the wall clock per profiled step (profiler overhead included).

    Returns ``{"times_ms", "step_ms_median", "profiled_wall_ms", "gpu_busy_ms", "next", "pos"}``;
    ``next`` is the last greedy token ``[B, 1]`` and ``pos`` the next position."""
    batch, dev = nxt.shape[0], nxt.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(nxt, p):  # one greedy decode step at position p
        position = torch.full((batch, 1), p, device=dev, dtype=torch.long)
        return model(input_ids=nxt, past_key_values=cache, use_cache=True,
                     position_ids=position).logits[:, -1:].argmax(-1)

    times, gpu_ms, prof_wall = [], None, None
    with torch.inference_mode():
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            nxt = step(nxt, pos)
            sync()
            times.append((time.perf_counter() - t) * 1e3)
            pos += 1
        if profile_steps > 0:
            use_prof = dev.type == "cuda" or profile_log is not None
            sync()
            t = time.perf_counter()
            if use_prof:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
                with profile(activities=acts) as prof:
                    for _ in range(profile_steps):
                        nxt = step(nxt, pos)
                        pos += 1
                    sync()
            else:
                for _ in range(profile_steps):
                    nxt = step(nxt, pos)
                    pos += 1
                sync()
            prof_wall = (time.perf_counter() - t) * 1e3 / profile_steps
            if use_prof:
                kern_us = _kernel_us(prof)
                gpu_ms = kern_us / (profile_steps * 1e3) if kern_us > 0 else None
                if profile_log is not None:
                    profile_log(f"profile of {profile_steps} decode steps ({label}):\n"
                                + prof.key_averages().table(sort_by="cpu_time_total", row_limit=14,
                                                            max_name_column_width=48))
    return {"times_ms": times, "step_ms_median": _median(times), "profiled_wall_ms": prof_wall,
            "gpu_busy_ms": gpu_ms, "next": nxt, "pos": pos}


def _text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def fill_cache(model, cache, batch: int, length: int, seed: int = 0, tail: int = 0, chunk: int = 8192) -> None:
    """Fill ``cache`` up to ``length`` tokens with random K/V, without running the model.

    For every decoder layer ``cache.update(k, v, layer_idx)`` is called, as transformers'
    ``LlamaAttention`` calls it (5.17 passes no cache kwargs; 5.2x passes only its own kwargs, which
    no cache of ours reads), with ``k, v ~ N(0, 1)`` of shape ``[batch, n_kv_heads, n, head_dim]`` in
    the model's dtype on the model's device. One layer's tensors exist at a time. The cache may
    already hold tokens (``cache.get_seq_length()``): it is extended from there, so one cache can be
    measured at increasing contexts. ``DynamicCache``, ``StaticCache`` and ``MustafarCache`` work.

    * ``MustafarCache``: each layer gets the new tokens in one multi-token update, i.e. exactly the
      prefill path (everything but the last ``local_window`` tokens is pruned and bitmap-encoded, the
      window stays dense). Splitting it into chunks would take the cache's chunked-prompt path, which
      decodes the whole compressed part once per chunk, so it is not chunked. Extending a filled
      cache is one such call (the slow path once per layer, then the same state as after a prefill).
    * ``StaticCache``: written in chunks of ``chunk`` tokens (it appends in place).
    * ``DynamicCache``: one update per layer (it grows by ``torch.cat``; chunks would re-copy).

    ``tail``: the last ``tail`` of the new tokens are appended one token per ``update`` call, as
    decode steps append them (a MustafarCache keeps them in its dense window and compresses a chunk
    when the window exceeds ``local_window + compress_chunk``): used to place the window so that a
    chosen decode step compresses. A 1-token update is always such a decode-style append.

    Why random K/V are enough for speed: the timed decode steps run the real model (embedding,
    every layer's projections and MLP, attention over the cache, the LM head); only the prompt's
    K/V are drawn instead of computed by a prefill. The benchmark models have random weights, so
    a prefill would produce random K/V too, and the time of the kernels depends on the tensor
    shapes, the counts (tokens compressed, window rows) and the bitmaps' layout (a fixed number of
    set bits per token vector at a given sparsity), not on the values."""
    from mustafar.cache import PENDING_DECODE

    cfg = _text_config(model)
    n_layers = cfg.num_hidden_layers
    h_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    p = next(model.parameters())
    dev, dt = p.device, p.dtype
    start = int(cache.get_seq_length())
    n_new = int(length) - start
    if n_new < 0:
        raise ValueError(f"cache already holds {start} tokens > length={length}")
    tail = int(tail)
    if not 0 <= tail <= n_new:
        raise ValueError(f"tail={tail} must be in [0, {n_new}] (new tokens)")
    if n_new == 0:
        return
    bulk = n_new - tail
    static = type(cache).__name__ == "StaticCache"
    step = max(1, int(chunk)) if static else max(1, bulk)
    g = torch.Generator(device=dev).manual_seed(int(seed))

    def shape(n):
        return (batch, h_kv, n, d)

    with torch.no_grad():
        for layer in range(n_layers):
            for s0 in range(0, bulk, step):
                n = min(step, bulk - s0)
                k = torch.randn(shape(n), generator=g, device=dev, dtype=dt)
                v = torch.randn(shape(n), generator=g, device=dev, dtype=dt)
                cache.update(k, v, layer)
                del k, v
            if tail:
                k = torch.randn(shape(tail), generator=g, device=dev, dtype=dt)
                v = torch.randn(shape(tail), generator=g, device=dev, dtype=dt)
                for i in range(tail):
                    cache.update(k[:, :, i : i + 1], v[:, :, i : i + 1], layer)
                del k, v
            # a compressed decode-style update marks the layer for its attention call, which never
            # comes here (no model call): clear the mark
            PENDING_DECODE.pop(layer, None)


def _new_cache(kind: str, model, s: float, max_len: int):
    """``dense`` -> transformers ``DynamicCache``; otherwise :func:`_make_cache`.

    A MustafarCache switches the model to the ``"mustafar"`` attention, whose mask function returns
    no mask for a plain decode step; a dense cache built afterwards would run under it (for a
    StaticCache: sdpa over the whole preallocated buffer without the padding mask). Dense caches
    therefore switch the model back to ``"sdpa"`` first."""
    if kind in ("dense", "static") and getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
        model.set_attn_implementation("sdpa")
    if kind == "dense":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    return _make_cache(kind, model, s, max_len)


def _prefill(model, cache, batch: int, length: int, seed: int = 1):
    """The original fill of :func:`step_timing`: a real prefill of random token ids; returns the greedy next token."""
    vocab, dev = model.config.vocab_size, next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), device=dev, generator=g)
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def _random_fill(model, cache, batch: int, length: int, seed: int = 1):
    """:func:`fill_cache` to ``length`` tokens; returns random next token ids ``[batch, 1]``."""
    fill_cache(model, cache, batch, length, seed=seed)
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    return torch.randint(0, model.config.vocab_size, (batch, 1), device=dev, generator=g)


FILLS = {"prefill": _prefill, "random": _random_fill}


def step_timing(model, kind: str, s: float, batch: int, prompt: int, steps: int, profile_log=None,
                fill="prefill") -> dict:
    """One decode step after filling the cache with ``prompt`` tokens (see module doc): the median
    wall-clock milliseconds over ``steps`` steps, and (CUDA) the GPU-busy milliseconds per step: the
    summed duration of the kernels of three more steps run under ``torch.profiler``, divided by three.
    The second number is what a runtime without Python and launch overhead (CUDA graphs, static shapes)
    would approach; HF's eager loop is CPU-bound here, so the first one mostly measures Python.

    ``fill``: ``"prefill"`` (a real prefill of random token ids, the original method), ``"random"``
    (:func:`fill_cache`: random K/V, no prefill) or a callable ``fill(model, cache, batch, prompt)``
    returning the next token ids ``[batch, 1]``.

    With ``profile_log`` (a print-like callable) the operators with the largest CPU time are logged."""
    filler = FILLS[fill] if isinstance(fill, str) else fill
    cache = _new_cache(kind, model, s, prompt + steps + 8)
    nxt = filler(model, cache, batch, prompt)
    r = _run_steps(model, cache, nxt, prompt, steps, 3, profile_log=profile_log,
                   label=f"{kind}, B={batch}, P={prompt}")
    return {"step_ms_median": r["step_ms_median"], "gpu_busy_ms": r["gpu_busy_ms"]}


def _kv_fraction(kind: str, s: float, d: int) -> float:
    """Bytes of the stored K/V per token relative to dense fp16 (for the KV budget): 1 for the dense
    caches, else the format's bitmap + k values (:func:`mustafar.format.format_bytes_ratio`)."""
    from mustafar.format import format_bytes_ratio

    return 1.0 if kind in ("dense", "static") else format_bytes_ratio(d, s)


def run(models=("llama2-7b", "llama3-8b"), prompts=(2048, 4096), gen=1024, batches=(1, 4, 8, 16),
        sparsities=(0.5, 0.7), kv_budget_gib=40.0, check_tokens=128, check_dtypes=("float32", "float16"),
        step_steps=0, profile_steps=False, step_batches=(1, 8), dense_caches=("dense",), log=print) -> dict:
    import mustafar

    rows, checks, steps = [], [], []
    for name in models:
        if check_tokens:
            for dt_name in check_dtypes:
                model, _ = mustafar.load_model(name, dtype=getattr(torch, dt_name), device="cuda")
                chk = token_check(model, check_tokens)
                chk["model"] = name
                checks.append(chk)
                log(f"{name} {dt_name}: compressed vs simulate, {check_tokens} greedy tokens: leading equal "
                    f"{chk['leading_tokens_equal']}, fraction equal {chk['fraction_equal']:.3f}, "
                    f"first difference {chk['first_difference']}")
                del model
                torch.cuda.empty_cache()
        model, _ = mustafar.load_model(name, dtype=torch.float16, device="cuda")
        cfg = model.config
        n_layers, h_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        vocab = cfg.vocab_size
        g = torch.Generator(device="cuda").manual_seed(0)
        if step_steps:
            for b in step_batches:
                for kind, s in [(c, 0.0) for c in dense_caches] + [("compressed", s) for s in sparsities]:
                    kv = 2 * n_layers * b * h_kv * (prompts[0] + step_steps + 8) * d * 2 * _kv_fraction(kind, s, d)
                    if kv > kv_budget_gib * (1 << 30):
                        log(f"skip step timing {name} B={b} {kind} s={s}: KV {kv / 2**30:.1f} GiB > budget")
                        continue
                    r = step_timing(model, kind, s, b, prompts[0], step_steps,
                                    profile_log=log if (profile_steps and b == 1) else None)
                    ms, gms = r["step_ms_median"], r["gpu_busy_ms"]
                    steps.append({"model": name, "prompt": prompts[0], "batch": b, "cache": kind, "sparsity": s,
                                  "step_ms_median": ms, "tok_per_s": b * 1e3 / ms, "steps": step_steps,
                                  "kv_gib_est": kv / 2**30, "gpu_busy_ms": gms,
                                  "tok_per_s_gpu_busy": (b * 1e3 / gms) if gms else None})
                    log(f"{name} P={prompts[0]} B={b} {kind} s={s}: one decode step {ms:.2f} ms "
                        f"({b * 1e3 / ms:.1f} tok/s); GPU busy {gms if gms is None else round(gms, 3)} ms "
                        f"({(b * 1e3 / gms) if gms else float('nan'):.1f} tok/s)")
                    torch.cuda.empty_cache()
        for p_len in (prompts if gen > 0 else ()):
            for b in batches:
                dense_kv = 2 * n_layers * b * h_kv * (p_len + gen) * d * 2
                if dense_kv > kv_budget_gib * (1 << 30):
                    log(f"skip {name} P={p_len} B={b}: dense KV {dense_kv / 2**30:.1f} GiB > budget")
                    continue
                ids = torch.randint(0, vocab, (b, p_len), device="cuda", generator=g)
                for kind, s in [("dense", 0.0)] + [("compressed", s) for s in sparsities]:
                    max_len = p_len + gen + 8
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    # prefill-only reference (1 new token), then the full run
                    _, t1 = _sync_time(lambda: _generate(model, ids, 1, _make_cache(kind, model, s, max_len)))
                    cache = _make_cache(kind, model, s, max_len)
                    out, tt = _sync_time(lambda: _generate(model, ids, gen, cache))
                    peak = torch.cuda.max_memory_allocated() - base
                    n_new = out.shape[1] - p_len
                    dec_t = max(tt - t1, 1e-9)
                    cache_bytes = cache.nbytes() if cache is not None and hasattr(cache, "nbytes") else dense_kv
                    row = {"model": name, "prompt": p_len, "gen": n_new, "batch": b, "cache": kind, "sparsity": s,
                           "total_s": tt, "prefill_1tok_s": t1, "decode_tok_per_s": b * (n_new - 1) / dec_t,
                           "peak_mem_gib": peak / 2**30, "cache_gib": cache_bytes / 2**30,
                           "dense_kv_gib": dense_kv / 2**30}
                    rows.append(row)
                    log(f"{name} P={p_len} B={b:2d} {kind:10s} s={s:.1f}: {row['decode_tok_per_s']:8.1f} tok/s  "
                        f"total {tt:6.2f}s  peak {row['peak_mem_gib']:.1f} GiB  cache {row['cache_gib']:.2f} GiB")
                    del cache, out
        del model
        torch.cuda.empty_cache()
    return {"rows": rows, "checks": checks, "step_timing": steps}


# ------------------------------------------------------------------------------------------------
# --grid / --longest: random-K/V fill, GPU-busy step time per context, derived tokens/s
# ------------------------------------------------------------------------------------------------
GIB = 1 << 30
PROFILED_STEPS = 3  # steps under torch.profiler per measurement (GPU-busy time)
DEFAULT_RATIOS = ("2048:1024", "4096:1024", "1024:4096", "2048:2048")
DEFAULT_GRID_BATCHES = (1, 8, 16, 32, 64, 128)


def kv_geometry(model_or_config, dtype: torch.dtype = torch.float16, mustafar_config=None) -> dict:
    """What the KV arithmetic needs: layers, KV heads, head_dim, element size, and the MustafarCache
    window schedule (``local_window``, ``compress_chunk``; default :class:`mustafar.MustafarConfig`)."""
    from mustafar.cache import MustafarConfig

    cfg = _text_config(model_or_config)
    mc = mustafar_config or MustafarConfig()
    return {"layers": int(cfg.num_hidden_layers),
            "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
            "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
            "itemsize": torch.empty((), dtype=dtype).element_size(),
            "local_window": mc.local_window, "compress_chunk": mc.compress_chunk}


def kv_bytes(kind: str, s: float, geo: dict, batch: int, ctx: int) -> int:
    """Bytes the cache holds for ``batch`` sequences of ``ctx`` tokens.

    ``dense`` / ``static``: ``2 * layers * batch * kv_heads * ctx * head_dim * itemsize``.
    ``compressed``: exactly what ``MustafarCache(max_cache_len=ctx).nbytes()`` holds (tests check it):
    per layer the bitmaps (int64, ``head_dim / 64`` words) and the kept values of K and V for
    ``round8(ctx)`` rows, the dense K/V window at its capacity ``local_window + compress_chunk + 1``
    rows (its steady state during a long generation) and the 16-byte counter. Unlike
    :func:`_kv_fraction` this counts the window: at B=128 on Llama-2-7B it alone is 18 GiB."""
    from mustafar.cache import MustafarConfig

    L, H, D, it = geo["layers"], geo["kv_heads"], geo["head_dim"], geo["itemsize"]
    if kind in ("dense", "static"):
        return 2 * L * batch * H * ctx * D * it
    if kind != "compressed":
        raise ValueError(f"unknown cache kind {kind!r}")
    mc = MustafarConfig(k_sparsity=s, v_sparsity=s, local_window=geo["local_window"],
                        compress_chunk=geo["compress_chunk"])
    kk, kv = mc.kept("k", D), mc.kept("v", D)
    cap = -(-int(ctx) // 8) * 8
    wcap = geo["local_window"] + geo["compress_chunk"] + 1
    per_seq = H * (cap * (2 * (D // 64) * 8 + (kk + kv) * it) + 2 * wcap * D * it)
    return L * (batch * per_seq + 16)


def max_batch(kind: str, s: float, geo: dict, ctx: int, budget_bytes: float) -> int:
    """Largest batch whose :func:`kv_bytes` at ``ctx`` tokens fits ``budget_bytes`` (0 if none)."""
    fixed = kv_bytes(kind, s, geo, 0, ctx)
    per = kv_bytes(kind, s, geo, 1, ctx) - fixed
    return max(0, int((budget_bytes - fixed) // per))


def _check_budget(budget_bytes) -> float:
    import math

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
    ``multiple`` tokens fit. Bytes per token: :func:`kv_bytes` (dense: ``2 * layers * kv_heads *
    head_dim * itemsize``; compressed: bitmaps + kept values, plus the fixed dense window).

    Raises ``ValueError`` for a budget that is not a positive finite number, ``batch < 1``,
    ``multiple < 1`` or ``extra_tokens < 0``."""
    b = _check_budget(budget_bytes)
    if int(batch) < 1 or int(multiple) < 1 or int(extra_tokens) < 0:
        raise ValueError(f"batch={batch} and multiple={multiple} must be >= 1, extra_tokens={extra_tokens} >= 0")
    fixed = kv_bytes(kind, s, geo, batch, 0)
    per_tok = (kv_bytes(kind, s, geo, batch, 8 * 1024) - fixed) / (8 * 1024)  # exact on multiples of 8
    n = int((b - fixed) // per_tok) - int(extra_tokens)
    ctx = max(0, n // multiple * multiple)
    while ctx > 0 and kv_bytes(kind, s, geo, batch, ctx + extra_tokens) > b:  # round8 of the store
        ctx -= multiple
    return ctx


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


def _cache_kinds(dense_caches, sparsities) -> list[tuple[str, float]]:
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
    _check_budget(budget_bytes)
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
    ~1 s per session, see :func:`_kernel_us`); per compressed sweep the encode of its tokens
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


def _step_ms(row: dict) -> tuple[float | None, str]:
    """A measured row's step time and its source: GPU-busy where the profiler saw kernels, else the
    wall-clock median (CPU runs)."""
    if row.get("gpu_busy_ms"):
        return row["gpu_busy_ms"], "gpu_busy"
    return row.get("step_ms_median"), "wall_median"


def _affine_fit(xs, ys):
    """Least-squares ``y = a + b x``; ``(a, b)`` (``b = 0`` for one distinct x)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return my - b * mx, b


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
                     "window_fit": _affine_fit(bs, win), "compress_fit": _affine_fit(bs, comp),
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
                    (t_p, src_p), (t_pg, src_pg) = _step_ms(r_p), _step_ms(r_pg)
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
        pts = [(r["context"], _step_ms(r)[0]) for r in rs if _step_ms(r)[0] is not None]
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
            a, sl = _affine_fit([c for c, _ in pts], [v for _, v in pts])
            res = [abs(v - (a + sl * c)) / v for c, v in pts]
            linearity["fits"].append({"model": m, "cache": kind, "sparsity": s, "batch": b,
                                      "contexts": [c for c, _ in pts], "intercept_ms": a, "ms_per_1k_tokens": sl * 1e3,
                                      "max_rel_residual": max(res)})
    cycle_fit = [{"model": m, "sparsity": s, **{k: v for k, v in f.items()}} for (m, s), f in fits.items()]
    return {"derived": derived, "best": best, "linearity": linearity, "cycle_fit": cycle_fit}


def _cache_nbytes(cache) -> int:
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def _compressed_tokens(cache) -> int:
    return int(cache.breakdown()["compressed_tokens"])


def _mem_reset(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _mem_peak(dev, base):
    return (torch.cuda.max_memory_allocated() - base) / GIB if dev.type == "cuda" else None


def _free(dev):
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(exc) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


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
    full = _run_steps(model, cache, nxt, pos, 0, 1)
    n1 = _compressed_tokens(cache)
    comp = _run_steps(model, cache, full["next"], full["pos"], 0, 1)
    n2 = _compressed_tokens(cache)
    empty = _run_steps(model, cache, comp["next"], comp["pos"], 0, 3)
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


def _run_sweep(model, name, sw, geo, steps, base, log, prog, seed, out_rows, out_cycles):
    kind, s, b = sw["kind"], sw["sparsity"], sw["batch"]
    dev = next(model.parameters()).device
    label = f"{name} {kind}{'' if kind != 'compressed' else f' s={s}'} B={b}"
    cache = _new_cache(kind, model, s, sw["max_len"])
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
            if dev.type == "cuda":
                torch.cuda.synchronize()
            fill_s = time.perf_counter() - t
            if nxt is None:
                g = torch.Generator(device=dev).manual_seed(seed)
                nxt = torch.randint(0, model.config.vocab_size, (b, 1), device=dev, generator=g)
            _mem_reset(dev)
            r = _run_steps(model, cache, nxt, ctx, steps, PROFILED_STEPS)
            nxt = r["next"]
            peak = _mem_peak(dev, base)
            row = {"model": name, "cache": kind, "sparsity": s, "batch": b, "context": ctx,
                   "step_ms_median": r["step_ms_median"], "step_ms_all": r["times_ms"],
                   "profiled_wall_ms": r["profiled_wall_ms"], "gpu_busy_ms": r["gpu_busy_ms"],
                   "steps": steps, "profiled_steps": PROFILED_STEPS, "fill_s": fill_s,
                   "cache_gib": _cache_nbytes(cache) / GIB, "cache_max_len": sw["max_len"],
                   "kv_gib_planned": kv_bytes(kind, s, geo, b, ctx) / GIB, "peak_mem_gib": peak,
                   "seq_length_after": int(cache.get_seq_length())}
            out_rows.append(row)
            gms = row["gpu_busy_ms"]
            log(f"{prog.tick()} {label} ctx={ctx}: fill {fill_s:.2f} s, step {row['step_ms_median']:.1f} ms wall, "
                f"GPU busy {'n/a' if gms is None else f'{gms:.2f} ms'}, cache {row['cache_gib']:.2f} GiB"
                + ("" if peak is None else f", peak {peak:.2f} GiB"))
    except Exception as exc:  # noqa: BLE001  (one failing configuration must not lose the others)
        oom = _is_oom(exc)
        log(f"{'OOM' if oom else 'ERROR'} in {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        out_rows.append({"model": name, "cache": kind, "sparsity": s, "batch": b, "context": None, "oom": oom,
                         "error": f"{type(exc).__name__}: {str(exc)[:1000]}"})
    finally:
        del cache
        _free(dev)


def _run_longest(model, name, geo, kinds, budget_bytes, steps, base, log, seed) -> list[dict]:
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
                cache = _new_cache(kind, model, s, ctx + extra)
                t = time.perf_counter()
                fill_cache(model, cache, 1, ctx, seed=seed)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                fill_s = time.perf_counter() - t
                g = torch.Generator(device=dev).manual_seed(seed)
                nxt = torch.randint(0, model.config.vocab_size, (1, 1), device=dev, generator=g)
                _mem_reset(dev)
                r = _run_steps(model, cache, nxt, ctx, steps, PROFILED_STEPS)
                t_ms, src = _step_ms(r)
                row = {"model": name, "cache": kind, "sparsity": s, "batch": 1, "context": ctx,
                       "kv_gib": _cache_nbytes(cache) / GIB, "kv_gib_planned": kv_bytes(kind, s, geo, 1, ctx + extra) / GIB,
                       "budget_gib": budget_bytes / GIB, "peak_mem_gib": _mem_peak(dev, base),
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
                if not _is_oom(exc):
                    log(f"longest {label}: ERROR at {ctx} tokens: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                    rows.append({"model": name, "cache": kind, "sparsity": s, "batch": 1, "context": ctx,
                                 "oom_steps_down": tried, "error": f"{type(exc).__name__}: {str(exc)[:1000]}"})
                    break
                tried.append(ctx)
                log(f"longest {label}: OOM at {ctx} tokens; stepping down 10 %")
                ctx = int(ctx * 0.9) // 1024 * 1024
            finally:
                del cache
                _free(dev)
        else:
            rows.append({"model": name, "cache": kind, "sparsity": s, "batch": 1, "context": 0,
                         "oom_steps_down": tried, "note": "not even 1024 tokens fit the budget / memory"})
    return rows


GRID_METHOD = (
    "Decode step times of random-weight models, the prompt's K/V drawn at random (N(0,1), model dtype) and "
    "written with cache.update per layer instead of computed by a prefill (mustafar.bench.e2e.fill_cache); the "
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
             add_max_batch=True, seed=0, log=print, checkpoint=None) -> dict:
    """``--grid`` and/or ``--longest`` (see the module doc); returns the results dict.
    ``checkpoint(res)`` is called after every model and sweep (the CLI writes the JSON there)."""
    import mustafar

    budget = _check_budget(kv_budget_gib * GIB)
    pairs = parse_ratios(ratios)
    kinds = _cache_kinds(dense_caches, sparsities)
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
                        "dtype": str(dtype).replace("torch.", ""), "add_max_batch": add_max_batch, "seed": seed},
           "method": GRID_METHOD.format(steps=steps)}
    t_start = time.perf_counter()
    prog = _Progress(n_meas, log)
    dev = torch.device(device)
    chunk = geos[models[0]]["compress_chunk"]

    def save():
        res.update(derive([r for r in res["grid"] if r.get("context") is not None and not r.get("error")],
                          res["window_cycles"], pairs, chunk=chunk, midpoint=midpoint))
        res["wall_s"] = time.perf_counter() - t_start
        res["kernel_time_source"] = {None: "none read yet (or no device events: CPU)",
                                     True: "raw kineto device events (equal to prof.events() at first use)",
                                     False: "prof.events() device events"}[_KINETO_FAST]
        if checkpoint is not None:
            checkpoint(res)

    def load(name):
        _free(dev)
        model, _ = mustafar.load_model(name, dtype=dtype, device=device)
        _free(dev)
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
                           res["window_cycles"])
                save()
        del model
        _free(dev)
    for name in (models if longest else ()):
        model, base = load(name)
        with torch.inference_mode():
            res["longest"] += _run_longest(model, name, geos[name], kinds, budget, steps, base, log, seed)
        save()
        del model
        _free(dev)
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


def _provenance(argv):
    if torch.cuda.is_available():
        from mustafar.bench.kernel import provenance

        return provenance(argv, module="mustafar.bench.e2e")
    from mustafar.provenance import collect

    prov = collect(command="python -m mustafar.bench.e2e " + " ".join(argv))
    prov["sm_count"] = None
    return prov


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m mustafar.bench.e2e", description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["llama2-7b", "llama3-8b"])
    ap.add_argument("--prompts", nargs="+", type=int, default=[2048, 4096])
    ap.add_argument("--gen", type=int, default=1024, help="generated tokens per run (0: no generate runs)")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7])
    ap.add_argument("--kv-budget-gib", type=float, default=40.0)
    ap.add_argument("--check-tokens", type=int, default=128)
    ap.add_argument("--check-dtypes", nargs="+", default=["float32", "float16"])
    ap.add_argument("--step-timing", type=int, default=0, metavar="N", help="time N single decode steps")
    ap.add_argument("--profile-steps", action="store_true", help="torch.profiler table of 3 steps at B=1")
    ap.add_argument("--dense-caches", nargs="+", default=["dense"], choices=["dense", "static"],
                    help="dense baselines of --step-timing, --grid and --longest: dense = DynamicCache (grows by "
                         "torch.cat), static = transformers StaticCache (preallocated)")
    ap.add_argument("--step-batches", nargs="+", type=int, default=[1, 8],
                    help="batches for --step-timing (skipped where the KV estimate exceeds --kv-budget-gib)")
    ap.add_argument("--out", default=None,
                    help="output JSON (default results/e2e_grid_h200.json with --grid/--longest, else "
                         "results/e2e_h200.json)")
    g = ap.add_argument_group("grid / longest context (random-K/V fill, no prefill; see the module doc)")
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
    args = ap.parse_args(argv)
    grid_mode = args.grid or args.longest or args.estimate_only
    out_path = args.out or os.path.join("results", "e2e_grid_h200.json" if grid_mode else "e2e_h200.json")
    if grid_mode:
        return _main_grid(args, argv, out_path)
    if not torch.cuda.is_available():
        print("mustafar.bench.e2e: needs a CUDA GPU", file=sys.stderr)
        return 2

    with _sdpa_backends():
        res = run(args.models, args.prompts, args.gen, args.batches, args.sparsities, args.kv_budget_gib,
                  args.check_tokens, args.check_dtypes, args.step_timing, args.profile_steps, args.step_batches,
                  args.dense_caches)
    res["sdpa_backends"] = "flash, efficient, math (cuDNN excluded)"
    res["provenance"] = _provenance(argv)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out_path}")
    return 0


def _main_grid(args, argv, out_path) -> int:
    if args.kv_budget_gib <= 0:
        print(f"mustafar.bench.e2e: --kv-budget-gib must be > 0, got {args.kv_budget_gib}", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"mustafar.bench.e2e: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available() and not args.estimate_only:
        print("mustafar.bench.e2e: needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    midpoint = None
    if str(args.midpoint).lower() != "none":
        try:
            midpoint = tuple(int(x) for x in args.midpoint.split(":"))
            assert len(midpoint) == 3 and min(midpoint) >= 1
        except (ValueError, AssertionError):
            print(f"mustafar.bench.e2e: --midpoint must be P:G:B or none, got {args.midpoint!r}", file=sys.stderr)
            return 2
    try:
        parse_ratios(args.ratios)
    except ValueError as exc:
        print(f"mustafar.bench.e2e: {exc}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)

    def log(*a):
        print(*a, flush=True)

    if args.estimate_only:
        margin = args.steps + PROFILED_STEPS + 8
        kinds = _cache_kinds(args.dense_caches, args.sparsities)
        geos = {m: kv_geometry(_model_config(m), dtype) for m in args.models}
        plans = {m: plan_grid(geos[m], kinds, parse_ratios(args.ratios), args.grid_batches, args.kv_budget_gib * GIB,
                              margin, midpoint, not args.no_max_batch) for m in args.models}
        for m, p in plans.items():
            for sw in p["sweeps"]:
                log(f"{m} {sw['kind']} s={sw['sparsity']} B={sw['batch']}: contexts {sw['contexts']}"
                    + (" + window cycle" if sw["cycle"] else ""))
        est = estimate_seconds(plans, geos, args.steps, n_longest=len(kinds))
        log(f"{sum(len(sw['contexts']) for p in plans.values() for sw in p['sweeps'])} measured contexts; "
            f"estimated H200 wall time ~{est:.0f} s (grid + longest)")
        return 0

    def checkpoint(res):
        res["sdpa_backends"] = "flash, efficient, math (cuDNN excluded)"
        res["provenance"] = prov
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, out_path)

    prov = _provenance(argv)
    with _sdpa_backends():
        res = run_grid(args.models, args.ratios, args.sparsities, args.dense_caches, args.grid_batches,
                       args.kv_budget_gib, args.steps, midpoint, grid=args.grid, longest=args.longest,
                       device=args.device, dtype=dtype, add_max_batch=not args.no_max_batch, seed=args.seed,
                       log=log, checkpoint=checkpoint)
    checkpoint(res)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
