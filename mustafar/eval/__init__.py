"""Accuracy evaluation of pruned KV caches: RULER-style synthetic tasks, LongBench, perplexity, sweeps.

Modules: :mod:`~mustafar.eval.ruler`, :mod:`~mustafar.eval.longbench`, :mod:`~mustafar.eval.perplexity`,
:mod:`~mustafar.eval.metrics`, :mod:`~mustafar.eval.sweep` (runs, shards), :mod:`~mustafar.eval.tables` (summary, Pareto),
:mod:`~mustafar.eval.peers` (kvpress and quantized-cache peers at equal bytes), :mod:`~mustafar.eval.texts`,
:mod:`~mustafar.eval.runtime` (one dense prefill, many pruned decodes).

CLI: ``python -m mustafar.eval sweep --model smollm2-135m --profile quick``.
"""
from __future__ import annotations

__all__ = ["run_sweep", "summarize", "pareto", "CacheSpec"]


def __getattr__(name):  # lazy: importing the package pulls in nothing heavy
    if name == "run_sweep":
        from .sweep import run_sweep
        return run_sweep
    if name in ("summarize", "pareto"):
        from . import tables
        return getattr(tables, name)
    if name == "CacheSpec":
        from .runtime import CacheSpec
        return CacheSpec
    raise AttributeError(f"module 'mustafar.eval' has no attribute {name!r}")
