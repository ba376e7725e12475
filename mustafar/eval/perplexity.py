"""Perplexity of a long natural text decoded through a (pruned) KV cache.

The text is the prose of the Python Language Reference (:mod:`mustafar.eval.texts`, stdlib
``pydoc_data``). For each segment the first ``prefill_tokens`` tokens are prefilled (dense
attention, then the cache prunes everything but its local window), and the following
``eval_tokens`` tokens are teacher-forced **one token at a time** through the cache, so every
predicted token attends to the pruned past. The prefill is shared between configurations
(:mod:`mustafar.eval.runtime`). ``ppl = exp(mean NLL)`` over all evaluated tokens.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from .runtime import CacheSpec, build_cache, needs_queries, prefill, teacher_forced_nll
from .texts import prose_text

__all__ = ["text_segments", "run_perplexity", "perplexity"]


def text_segments(tokenizer, prefill_tokens: int, eval_tokens: int, n_segments: int = 1) -> list[torch.Tensor]:
    """Consecutive, non-overlapping token windows of the prose, each ``prefill_tokens + eval_tokens`` long.

    Returns
    -------
    list of LongTensor ``[prefill_tokens + eval_tokens]``
    """
    if prefill_tokens < 1 or eval_tokens < 1 or n_segments < 1:
        raise ValueError(f"prefill_tokens, eval_tokens, n_segments must be >= 1, got {prefill_tokens}, {eval_tokens}, {n_segments}")
    ids = tokenizer(prose_text(), add_special_tokens=False)["input_ids"]
    L = prefill_tokens + eval_tokens
    if len(ids) < L * n_segments:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than n_segments * (prefill+eval) = {L * n_segments}")
    return [torch.tensor(ids[i * L:(i + 1) * L]) for i in range(n_segments)]


def run_perplexity(model, tokenizer, specs: Sequence[CacheSpec], prefill_tokens: int = 1024, eval_tokens: int = 128,
                   n_segments: int = 1, progress: bool = True) -> dict:
    """Perplexity per spec over the same segments.

    Returns
    -------
    dict spec.name -> dict(ppl, mean_nll, nll (list of float per evaluated token), mode, seconds_decode,
    bytes_measured, bytes_dense)
    """
    from tqdm.auto import tqdm

    need_q = needs_queries(specs)
    res = {s.name: dict(nll=[], mode=s.mode, seconds_decode=0.0, bytes_measured=0, bytes_dense=0) for s in specs}
    for seg in tqdm(text_segments(tokenizer, prefill_tokens, eval_tokens, n_segments), desc="ppl",
                    leave=False, disable=not progress):
        state = prefill(model, seg[:prefill_tokens].view(1, -1), capture_queries=need_q)
        targets = seg[prefill_tokens:]
        for spec in specs:
            t0 = time.perf_counter()
            cache, _ = build_cache(model, state, spec, eval_tokens)
            nll = teacher_forced_nll(model, cache, state, targets)
            r = res[spec.name]
            r["seconds_decode"] += time.perf_counter() - t0
            r["nll"].extend(float(x) for x in nll)
            if hasattr(cache, "nbytes"):
                r["bytes_measured"] += cache.nbytes()
                r["bytes_dense"] += cache.dense_nbytes()
    for r in res.values():
        r["mean_nll"] = sum(r["nll"]) / len(r["nll"])
        r["ppl"] = math.exp(r["mean_nll"])
    return res


def perplexity(model, tokenizer, spec: CacheSpec | None = None, prefill_tokens: int = 1024, eval_tokens: int = 128,
               n_segments: int = 1) -> tuple[float, list[float]]:
    """``(ppl, per-token NLL)`` of one configuration (dense when ``spec`` is None)."""
    spec = spec or CacheSpec()
    r = run_perplexity(model, tokenizer, [spec], prefill_tokens, eval_tokens, n_segments, progress=False)[spec.name]
    return r["ppl"], r["nll"]
