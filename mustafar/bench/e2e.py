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
step (summed kernel time of three steps under ``torch.profiler``): HF's eager loop is CPU-bound on
the H200 (25-60 ms of CPU per 7-8B step), so the GPU-busy time is the comparison that a runtime
without Python overhead would see. ``--dense-caches dense static`` adds transformers'
``StaticCache`` (preallocated) as a second dense baseline next to ``DynamicCache`` (which grows by
``torch.cat``, re-copying the cache every step). ``--gen 0`` skips the ``generate`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

__all__ = ["main", "run"]


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


def step_timing(model, kind: str, s: float, batch: int, prompt: int, steps: int, profile_log=None) -> dict:
    """One decode step after a ``prompt``-token prefill (see module doc): the median wall-clock
    milliseconds over ``steps`` steps, and (CUDA) the GPU-busy milliseconds per step: the summed
    duration of the kernels of three more steps run under ``torch.profiler``, divided by three. The
    second number is what a runtime without Python and launch overhead (CUDA graphs, static shapes)
    would approach; HF's eager loop is CPU-bound here, so the first one mostly measures Python.

    With ``profile_log`` (a print-like callable) the operators with the largest CPU time are logged."""
    vocab, dev = model.config.vocab_size, next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, vocab, (batch, prompt), device=dev, generator=g)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cache = _make_cache(kind, model, s, prompt + steps + 8)
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    times = []
    gpu_ms = None
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        del out

        def step(nxt, i):  # one greedy decode step at position prompt + i
            pos = torch.full((batch, 1), prompt + i, device=dev, dtype=torch.long)
            return model(input_ids=nxt, past_key_values=cache, use_cache=True, position_ids=pos).logits[:, -1:].argmax(-1)

        for i in range(steps):
            sync()
            t = time.perf_counter()
            nxt = step(nxt, i)
            sync()
            times.append((time.perf_counter() - t) * 1e3)
        if dev.type == "cuda" or profile_log is not None:
            from torch.autograd import DeviceType
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for i in range(steps, steps + 3):
                    nxt = step(nxt, i)
                sync()
            kern_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
            gpu_ms = kern_us / 3e3 if kern_us > 0 else None
            if profile_log is not None:
                profile_log(f"profile of 3 decode steps ({kind}, B={batch}, P={prompt}):\n"
                            + prof.key_averages().table(sort_by="cpu_time_total", row_limit=14,
                                                        max_name_column_width=48))
    times.sort()
    return {"step_ms_median": times[len(times) // 2], "gpu_busy_ms": gpu_ms}


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
                    help="dense baselines of --step-timing: dense = DynamicCache (grows by torch.cat), "
                         "static = transformers StaticCache (preallocated)")
    ap.add_argument("--step-batches", nargs="+", type=int, default=[1, 8],
                    help="batches for --step-timing (skipped where the KV estimate exceeds --kv-budget-gib)")
    ap.add_argument("--out", default=os.path.join("results", "e2e_h200.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("mustafar.bench.e2e: needs a CUDA GPU", file=sys.stderr)
        return 2
    from mustafar.bench.kernel import provenance

    with _sdpa_backends():
        res = run(args.models, args.prompts, args.gen, args.batches, args.sparsities, args.kv_budget_gib,
                  args.check_tokens, args.check_dtypes, args.step_timing, args.profile_steps, args.step_batches,
                  args.dense_caches)
    res["sdpa_backends"] = "flash, efficient, math (cuDNN excluded)"
    res["provenance"] = provenance(argv, module="mustafar.bench.e2e")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
