"""End-to-end decode throughput on a CUDA GPU: DynamicCache + SDPA vs MustafarCache (compressed).

``python -m mustafar.bench e2e [--models llama2-7b llama3-8b] [--prompts 2048 4096] [--gen 1024]
[--batches 1 4 8 16] [--sparsities 0.5 0.7] [--kv-budget-gib 40] [--check-tokens 128]
[--decode-kernel auto] [--out results/e2e_h200.json]`` (also ``python -m mustafar.bench.e2e``)

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
With ``--step-timing N`` it also times N single decode steps (``model(next_token, cache=cache)``,
synchronised, median) after a prefill for dense and MustafarCache, at each batch of
``--step-batches`` whose KV estimate fits ``--kv-budget-gib``, and records the GPU-busy time per
step (the union of the kernels' time intervals over three steps under ``torch.profiler``): HF's
eager loop is CPU-bound on the H200 (25-60 ms of CPU per 7-8B step), so the GPU-busy time is the
comparison that a runtime without Python overhead would see. ``--dense-caches dense static`` adds transformers'
``StaticCache`` (preallocated) as a second dense baseline next to ``DynamicCache`` (which grows by
``torch.cat``, re-copying the cache every step). ``--gen 0`` skips the ``generate`` runs.

``--decode-kernel`` picks the MustafarCaches' decode kernel (``MustafarConfig.decode_kernel``:
``auto`` or a CUDA kernel name). With ``--grid``, ``--longest`` or ``--estimate-only`` it runs the
decode tokens/s grid instead (:mod:`mustafar.bench.e2e_grid`, the same as ``python -m mustafar.bench
e2e-grid``; its options are listed by ``--help`` here too).
"""

from __future__ import annotations

import argparse
import sys

import torch

from mustafar import cache_kwargs
from mustafar.bench import e2e_grid
from mustafar.bench.common import (FILLS, MUSTAFAR_KINDS, SDPA_BACKENDS_NOTE, cache_nbytes, command_line,
                                   default_out, kv_shape, make_cache, require_cuda, sdpa_backends, timed_call,
                                   write_results)
from mustafar.bench.steps import run_steps

__all__ = ["kv_fraction", "main", "run", "step_timing", "token_check"]

# names that lived here before the grid had its own module; still importable from mustafar.bench.e2e
_MOVED = {"derive": "e2e_plan", "kv_bytes": "e2e_plan", "kv_geometry": "e2e_plan", "longest_context": "e2e_plan",
          "max_batch": "e2e_plan", "plan_grid": "e2e_plan", "tokens_per_s": "e2e_plan", "parse_ratios": "e2e_plan",
          "estimate_seconds": "e2e_plan", "run_grid": "e2e_grid", "fill_cache": "common"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"mustafar.bench.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _generate(model, ids, n_new, cache, **extra):
    """Greedy ``model.generate`` of exactly ``n_new`` tokens after ``ids [B, P]`` on ``cache``."""
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, use_cache=True,
              pad_token_id=0, eos_token_id=None, **extra)
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), **kw)


def token_check(model, n_new: int, sparsity: float = 0.7, prompt: int = 600, batch: int = 2, seed: int = 0,
                kernel: str = "auto") -> dict:
    """Greedy tokens of ``mode="compressed"`` vs ``mode="simulate"`` on random prompts (see module doc).

    Parameters
    ----------
    model : transformers causal LM
    n_new : int
        Greedy tokens generated by each cache.
    sparsity : float
        K and V sparsity of both caches.
    prompt, batch : int
        Random prompt ``[batch, prompt]`` (seeded by ``seed``).
    kernel : str
        The compressed cache's decode kernel (``MustafarConfig.decode_kernel``).

    Returns
    -------
    dict
        ``leading_tokens_equal`` (per sequence), ``fraction_equal`` and, per sequence, the
        ``first_difference`` (``None`` where all ``n_new`` agree; else its position, the simulate
        run's top-1 minus top-2 logit margin there and the largest logit difference up to it).
    """
    vocab, dev = model.config.vocab_size, next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt), device=dev, generator=g)
    outs, scores = {}, {}
    for kind in ("compressed", "simulate"):
        cache = make_cache(kind, model, sparsity, prompt + n_new + 8, kernel)
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


def step_timing(model, kind: str, s: float, batch: int, prompt: int, steps: int, profile_log=None,
                fill="prefill", kernel: str = "auto") -> dict:
    """One decode step after filling the cache with ``prompt`` tokens (see module doc): the median
    wall-clock milliseconds over ``steps`` steps, and (CUDA) the GPU-busy milliseconds per step: the
    union of the kernels' intervals over three more steps run under ``torch.profiler``, divided by three.
    The second number is what a runtime without Python and launch overhead (CUDA graphs, static shapes)
    would approach; HF's eager loop is CPU-bound here, so the first one mostly measures Python.

    ``kind``: a :func:`mustafar.bench.common.make_cache` kind. ``fill``: ``"prefill"`` (a real prefill
    of random token ids, the original method), ``"random"`` (:func:`mustafar.bench.common.fill_cache`:
    random K/V, no prefill) or a callable ``fill(model, cache, batch, prompt)`` returning the next
    token ids ``[batch, 1]``. ``kernel``: a MustafarCache's decode kernel.

    With ``profile_log`` (a print-like callable) the operators with the largest CPU time are logged.
    Returns ``{"step_ms_median", "gpu_busy_ms"}``."""
    filler = FILLS[fill] if isinstance(fill, str) else fill
    cache = make_cache(kind, model, s, prompt + steps + 8, kernel)
    nxt = filler(model, cache, batch, prompt)
    r = run_steps(model, cache, nxt, prompt, steps, 3, profile_log=profile_log,
                  label=f"{kind}, B={batch}, P={prompt}")
    return {"step_ms_median": r["step_ms_median"], "gpu_busy_ms": r["gpu_busy_ms"]}


def kv_fraction(kind: str, s: float, d: int) -> float:
    """Bytes of the stored K/V per token relative to dense fp16 (for the KV budget): 1 for the dense
    caches, else the format's bitmap + k values (:func:`mustafar.format.format_bytes_ratio`)."""
    from mustafar.format import format_bytes_ratio

    return 1.0 if kind in ("dense", "static") else format_bytes_ratio(d, s)


def run(models=("llama2-7b", "llama3-8b"), prompts=(2048, 4096), gen=1024, batches=(1, 4, 8, 16),
        sparsities=(0.5, 0.7), kv_budget_gib=40.0, check_tokens=128, check_dtypes=("float32", "float16"),
        step_steps=0, profile_steps=False, step_batches=(1, 8), dense_caches=("dense",), log=print,
        decode_kernel="auto") -> dict:
    """The generate benchmark and its token checks / step timing on CUDA (see the module doc).

    Parameters
    ----------
    models : names of :func:`mustafar.load_model` presets (random fp16 weights on CUDA)
    prompts, batches : prompt lengths and batches of the ``generate`` runs (``gen`` new tokens each;
        ``gen=0`` skips them); a (prompt, batch) whose dense KV exceeds ``kv_budget_gib`` is skipped
    sparsities : K and V sparsities of the compressed caches
    check_tokens, check_dtypes : greedy tokens of :func:`token_check`, in each dtype (0: no check)
    step_steps, step_batches, profile_steps, dense_caches : :func:`step_timing` at ``prompts[0]``
        (``step_steps=0``: none); ``profile_steps`` logs the profiler table at B=1
    log : print-like callable
    decode_kernel : the MustafarCaches' ``MustafarConfig.decode_kernel``

    Returns
    -------
    dict
        ``rows`` (one per generate run), ``checks`` (token checks), ``step_timing`` (step rows).
    """
    import mustafar

    rows, checks, steps = [], [], []
    for name in models:
        if check_tokens:
            for dt_name in check_dtypes:
                model, _ = mustafar.load_model(name, dtype=getattr(torch, dt_name), device="cuda")
                chk = token_check(model, check_tokens, kernel=decode_kernel)
                chk["model"] = name
                checks.append(chk)
                log(f"{name} {dt_name}: compressed vs simulate, {check_tokens} greedy tokens: leading equal "
                    f"{chk['leading_tokens_equal']}, fraction equal {chk['fraction_equal']:.3f}, "
                    f"first difference {chk['first_difference']}")
                del model
                torch.cuda.empty_cache()
        model, _ = mustafar.load_model(name, dtype=torch.float16, device="cuda")
        n_layers, h_kv, d = kv_shape(model)
        vocab = model.config.vocab_size
        g = torch.Generator(device="cuda").manual_seed(0)
        if step_steps:
            for b in step_batches:
                for kind, s in [(c, 0.0) for c in dense_caches] + [("compressed", s) for s in sparsities]:
                    kv = 2 * n_layers * b * h_kv * (prompts[0] + step_steps + 8) * d * 2 * kv_fraction(kind, s, d)
                    if kv > kv_budget_gib * (1 << 30):
                        log(f"skip step timing {name} B={b} {kind} s={s}: KV {kv / 2**30:.1f} GiB > budget")
                        continue
                    r = step_timing(model, kind, s, b, prompts[0], step_steps,
                                    profile_log=log if (profile_steps and b == 1) else None, kernel=decode_kernel)
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
                    _, t1 = timed_call(lambda: _generate(model, ids, 1, make_cache(kind, model, s, max_len, decode_kernel)),
                                       "cuda")
                    cache = make_cache(kind, model, s, max_len, decode_kernel)
                    out, tt = timed_call(lambda: _generate(model, ids, gen, cache), "cuda")
                    peak = torch.cuda.max_memory_allocated() - base
                    n_new = out.shape[1] - p_len
                    dec_t = max(tt - t1, 1e-9)
                    cache_bytes = cache_nbytes(cache) if kind in MUSTAFAR_KINDS else dense_kv
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


def main(argv: list[str] | None = None) -> int:
    """``python -m mustafar.bench e2e [options]`` (see the module doc); with ``--grid``, ``--longest``
    or ``--estimate-only``: :func:`mustafar.bench.e2e_grid.run_args`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m mustafar.bench e2e", description=__doc__.split("\n")[0])
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
    ap.add_argument("--decode-kernel", default="auto", choices=e2e_grid.DECODE_KERNELS,
                    help="the MustafarCaches' decode kernel (MustafarConfig.decode_kernel; CUDA names)")
    ap.add_argument("--out", default=None,
                    help="output JSON (default results/e2e_grid_h200.json with --grid/--longest, else "
                         "results/e2e_h200.json)")
    e2e_grid.add_arguments(ap, shared=False)
    args = ap.parse_args(argv)
    if args.grid or args.longest or args.estimate_only:
        return e2e_grid.run_args(args, command_line("e2e", argv))
    if not require_cuda("mustafar.bench e2e"):
        return 2
    with sdpa_backends():
        res = run(args.models, args.prompts, args.gen, args.batches, args.sparsities, args.kv_budget_gib,
                  args.check_tokens, args.check_dtypes, args.step_timing, args.profile_steps, args.step_batches,
                  args.dense_caches, decode_kernel=args.decode_kernel)
    res["sdpa_backends"] = SDPA_BACKENDS_NOTE
    out = write_results(args.out or default_out("e2e_h200.json"), res, command_line("e2e", argv))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
