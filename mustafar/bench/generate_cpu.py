"""CPU decode speed and memory of ``MustafarCache`` vs ``DynamicCache`` on SmolLM2-135M.

For each context length the prompt (real English text: CPython's ``pydoc_data.topics``, repeated) is
prefilled once with a ``DynamicCache``; the MustafarCache is filled from that same K/V through its
normal multi-token ``update`` (exactly what its own prefill does). Then both caches decode the same
greedy tokens alternately, step by step, and each step is timed (``time.perf_counter``; median over
steps). Results go to ``results/generate_cpu.json`` (:func:`mustafar.provenance.results_dir`).

Run: ``python -m mustafar.bench generate [--contexts 1024 2048 4096 8128] [--steps 16] [--sparsity 0.7]
[--random-weights CONFIG_JSON] [--threads N] [--out PATH]`` (also ``python -m mustafar.bench.generate_cpu``)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

import mustafar
from mustafar import MustafarCache, MustafarConfig, cache_kwargs
from mustafar.bench.common import command_line, default_out, fill_cache, set_threads, timed_call, write_results

__all__ = ["main", "memory_table", "run"]


def _prompt_ids(tok, n: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, return_tensors="pt").input_ids  # ~100K tokens of the Python reference manual
    while ids.shape[1] < n:
        ids = torch.cat([ids, ids], dim=1)
    return ids[:, :n]


def _fill_from(cache, dyn: DynamicCache):
    for i, layer in enumerate(dyn.layers):
        cache.update(layer.keys, layer.values, i)


@torch.no_grad()
def _step(model, cache, token) -> tuple[float, torch.Tensor]:
    """One greedy decode step: ``(seconds, next token [1, 1])``."""
    out, dt = timed_call(lambda: model(input_ids=token, use_cache=True, **cache_kwargs(model, cache)), "cpu")
    return dt, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def run(contexts=(1024, 2048, 4096, 8128), steps: int = 16, warmup: int = 2, sparsity: float = 0.7,
        random_weights: Path | None = None) -> dict:
    """Dense vs MustafarCache decode steps at each context (see the module doc).

    Parameters
    ----------
    contexts : prompt lengths (tokens)
    steps, warmup : timed and untimed decode steps per cache, interleaved dense / mustafar
    sparsity : K and V sparsity of the MustafarCache
    random_weights : path of a config.json, optional
        Build the model from it with random weights instead of loading SmolLM2-135M.

    Returns
    -------
    dict
        ``rows`` (one per context: step times, tokens/s, bytes, whether the greedy tokens agree),
        ``memory`` (:func:`memory_table`), model and config notes; :func:`main` adds the provenance.
    """
    if random_weights is None:
        model, tok = mustafar.load_model("smollm2-135m")
        model_name = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"
    else:  # same architecture from its config.json, random weights: same cost per step, meaningless tokens
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig.from_json_file(str(random_weights))).eval()
        tok = None
        model_name = f"random weights, architecture of {random_weights} (SmolLM2-135M config)"
    cfg = MustafarConfig(k_sparsity=sparsity, v_sparsity=sparsity)
    rows = []
    for n in tqdm(contexts, desc="contexts"):
        ids = _prompt_ids(tok, n) if tok is not None else torch.randint(3, model.config.vocab_size, (1, n))
        dyn = DynamicCache()
        out, prefill_s = timed_call(lambda: model(input_ids=ids, use_cache=True, **cache_kwargs(model, dyn)), "cpu")
        first = out.logits[:, -1:].argmax(-1)
        mc = MustafarCache(model, cfg, max_cache_len=n + steps + warmup)
        _, compress_s = timed_call(lambda: _fill_from(mc, dyn), "cpu")
        tok_d = tok_m = first
        td, tm, same = [], [], True
        for s in range(steps + warmup):
            a, tok_d = _step(model, dyn, tok_d)
            b, tok_m = _step(model, mc, tok_m)
            same &= bool(torch.equal(tok_d, tok_m))
            if s >= warmup:
                td.append(a)
                tm.append(b)
        bd = mc.breakdown()
        rows.append(dict(
            context=n, steps=steps, loadavg_1min_after=os.getloadavg()[0], cpu_count=os.cpu_count(), prefill_s=prefill_s, compress_prefill_s=compress_s,
            dense_step_ms_median=1e3 * statistics.median(td), mustafar_step_ms_median=1e3 * statistics.median(tm),
            dense_tok_s=1.0 / statistics.median(td), mustafar_tok_s=1.0 / statistics.median(tm),
            dense_step_ms_all=[1e3 * x for x in td], mustafar_step_ms_all=[1e3 * x for x in tm],
            same_greedy_tokens_as_dense=same,
            mustafar_nbytes=mc.nbytes(), dense_nbytes=mc.dense_nbytes(), breakdown=bd,
        ))
        tqdm.write(f"T={n}: dense {rows[-1]['dense_step_ms_median']:.1f} ms/step, mustafar "
                   f"{rows[-1]['mustafar_step_ms_median']:.1f} ms/step, bytes {mc.nbytes() / mc.dense_nbytes():.3f}")
        del dyn, mc
    return dict(model=model_name, dtype=str(model.dtype),
                head_dim=model.config.head_dim, layers=model.config.num_hidden_layers,
                kv_heads=model.config.num_key_value_heads, config=dict(vars(cfg)), rows=rows,
                memory=memory_table(),
                notes=("step = one full model forward of one token (30 layers, MLP included); medians over "
                       f"{steps} steps after {warmup} warm-up steps, dense and mustafar steps interleaved; "
                       "the window holds 32..288 dense tokens (compress_chunk=256); 2-core shared CPU, "
                       "other jobs may add noise (see loadavg_1min_after per row: above cpu_count the "
                       "machine was oversubscribed and absolute times are inflated)"))


def memory_table(t: int = 4096, layers: int = 30, kv_heads: int = 3, head_dim: int = 64) -> list[dict]:
    """Bytes of the cache at ``t`` tokens for SmolLM2's geometry, fp16 and fp32, 50% and 70%.

    Random K/V through the cache's own update path (:func:`mustafar.bench.common.fill_cache`: one
    prefill-style update of ``t`` tokens per layer, capacity exact).
    ``compressed_ratio``: stored rows (values + bitmaps) / dense bytes of the same tokens (window and
    bookkeeping excluded); ``total_ratio``: nbytes() / dense_nbytes() (everything included).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = []
    for dtype in (torch.float16, torch.float32):
        shell = LlamaForCausalLM(LlamaConfig(hidden_size=kv_heads * head_dim * 3, intermediate_size=8,
                                             num_hidden_layers=layers, num_attention_heads=kv_heads * 3,
                                             num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=8))
        shell = shell.to(dtype)
        for s in (0.5, 0.7):
            cache = MustafarCache(shell, MustafarConfig(k_sparsity=s, v_sparsity=s), max_cache_len=t)
            fill_cache(shell, cache, 1, t, seed=0)
            bd = cache.breakdown()
            n_c = bd["compressed_tokens"]
            dense_c = 2 * layers * kv_heads * n_c * head_dim * dtype.itemsize
            out.append(dict(dtype=str(dtype), sparsity=s, tokens=t, compressed_tokens=n_c,
                            compressed_ratio=(bd["payload_used"] + bd["bitmaps_used"]) / dense_c,
                            total_ratio=cache.nbytes() / cache.dense_nbytes(),
                            nbytes=cache.nbytes(), dense_nbytes=cache.dense_nbytes(), breakdown=bd))
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m mustafar.bench generate", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8128])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--out", type=Path, default=None, help="output JSON (default results/generate_cpu.json)")
    p.add_argument("--random-weights", type=Path, default=None, metavar="CONFIG_JSON",
                   help="build the model from this config.json with random weights (no checkpoint needed)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    a = p.parse_args(argv)
    set_threads(a.threads or None)  # 0: torch's default, as before
    res = run(tuple(a.contexts), a.steps, sparsity=a.sparsity, random_weights=a.random_weights)
    out = write_results(a.out or default_out("generate_cpu.json"), res, command_line("generate", argv),
                        backend=mustafar.ops.backend())
    for r in res["rows"]:
        print(f"T={r['context']:5d}  dense {r['dense_step_ms_median']:7.1f} ms/step ({r['dense_tok_s']:5.1f} tok/s)  "
              f"mustafar {r['mustafar_step_ms_median']:7.1f} ms/step ({r['mustafar_tok_s']:5.1f} tok/s)  "
              f"same tokens: {r['same_greedy_tokens_as_dense']}")
    for m in res["memory"]:
        print(f"{m['dtype']:14s} s={m['sparsity']}: compressed rows {m['compressed_ratio']:.3f} of dense, "
              f"everything {m['total_ratio']:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
