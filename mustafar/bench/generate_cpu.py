"""CPU decode speed and memory of ``MustafarCache`` vs ``DynamicCache`` on SmolLM2-135M.

For each context length the prompt (real English text: CPython's ``pydoc_data.topics``, repeated) is
prefilled once with a ``DynamicCache``; the MustafarCache is filled from that same K/V through its
normal multi-token ``update`` (exactly what its own prefill does). Then both caches decode the same
greedy tokens alternately, step by step, and each step is timed (``time.perf_counter``; median over
steps). Results go to ``results/generate_cpu.json``.

Run: ``python -m mustafar.bench.generate_cpu [--contexts 1024 2048 4096 8128] [--steps 16]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

import mustafar
from mustafar.cache import MustafarCache, MustafarConfig

RESULTS = Path(__file__).resolve().parents[2] / "results"


def _provenance() -> dict:
    from mustafar.provenance import collect

    return {**collect(), "threads": torch.get_num_threads(), "backend": mustafar.ops.backend()}


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
    t0 = time.perf_counter()
    out = model(input_ids=token, past_key_values=cache, use_cache=True)
    dt = time.perf_counter() - t0
    return dt, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def run(contexts=(1024, 2048, 4096, 8128), steps: int = 16, warmup: int = 2, sparsity: float = 0.7,
        random_weights: Path | None = None) -> dict:
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
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=dyn, use_cache=True)
        prefill_s = time.perf_counter() - t0
        first = out.logits[:, -1:].argmax(-1)
        mc = MustafarCache(model, cfg, max_cache_len=n + steps + warmup)
        t0 = time.perf_counter()
        _fill_from(mc, dyn)
        compress_s = time.perf_counter() - t0
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
                memory=memory_table(), provenance=_provenance(),
                notes=("step = one full model forward of one token (30 layers, MLP included); medians over "
                       f"{steps} steps after {warmup} warm-up steps, dense and mustafar steps interleaved; "
                       "the window holds 32..288 dense tokens (compress_chunk=256); 2-core shared CPU, "
                       "other jobs may add noise (see loadavg_1min_after per row: above cpu_count the "
                       "machine was oversubscribed and absolute times are inflated)"))


def memory_table(t: int = 4096, layers: int = 30, kv_heads: int = 3, head_dim: int = 64) -> list[dict]:
    """Bytes of the cache at ``t`` tokens for SmolLM2's geometry, fp16 and fp32, 50% and 70%.

    Random K/V through the cache's own update path (prefill of ``t`` tokens, capacity exact).
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
            g = torch.Generator().manual_seed(0)
            for i in range(layers):
                k = torch.randn(1, kv_heads, t, head_dim, generator=g).to(dtype)
                v = torch.randn(1, kv_heads, t, head_dim, generator=g).to(dtype)
                cache.update(k, v, i)
            bd = cache.breakdown()
            n_c = bd["compressed_tokens"]
            dense_c = 2 * layers * kv_heads * n_c * head_dim * dtype.itemsize
            out.append(dict(dtype=str(dtype), sparsity=s, tokens=t, compressed_tokens=n_c,
                            compressed_ratio=(bd["payload_used"] + bd["bitmaps_used"]) / dense_c,
                            total_ratio=cache.nbytes() / cache.dense_nbytes(),
                            nbytes=cache.nbytes(), dense_nbytes=cache.dense_nbytes(), breakdown=bd))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8128])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--out", type=Path, default=RESULTS / "generate_cpu.json")
    p.add_argument("--random-weights", type=Path, default=None, metavar="CONFIG_JSON",
                   help="build the model from this config.json with random weights (no checkpoint needed)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(tuple(a.contexts), a.steps, sparsity=a.sparsity, random_weights=a.random_weights)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1, default=str))
    for r in res["rows"]:
        print(f"T={r['context']:5d}  dense {r['dense_step_ms_median']:7.1f} ms/step ({r['dense_tok_s']:5.1f} tok/s)  "
              f"mustafar {r['mustafar_step_ms_median']:7.1f} ms/step ({r['mustafar_tok_s']:5.1f} tok/s)  "
              f"same tokens: {r['same_greedy_tokens_as_dense']}")
    for m in res["memory"]:
        print(f"{m['dtype']:14s} s={m['sparsity']}: compressed rows {m['compressed_ratio']:.3f} of dense, "
              f"everything {m['total_ratio']:.3f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
