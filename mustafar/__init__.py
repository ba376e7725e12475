"""mustafar: per-token magnitude pruning of the KV cache, a bitmap sparse format, and decode attention
that reads the compressed cache directly (MUSTAFAR, NeurIPS 2025, arXiv 2505.22913).

>>> import mustafar
>>> model, tok = mustafar.load_model("smollm2-135m")                        # doctest: +SKIP
>>> cache = mustafar.MustafarCache(model, mustafar.MustafarConfig(k_sparsity=0.7, v_sparsity=0.7))  # doctest: +SKIP
>>> out = model.generate(**tok("Hi", return_tensors="pt"), **mustafar.cache_kwargs(model, cache),
...                      max_new_tokens=8)                                   # doctest: +SKIP

The data path is the tree: ``pruning`` (score + select) -> ``format`` (bitmap layout, bytes) ->
``ops`` (the compiled ops and their reference) -> ``cache`` (``MustafarCache``, the ``"mustafar"``
attention). Importing the package registers the ``"mustafar"`` attention/mask functions with
transformers (its only side effect).
"""

from __future__ import annotations

import importlib

from mustafar import ops
from mustafar.cache import MustafarCache, cache_kwargs
from mustafar.cache import attention as _attention  # noqa: F401  (registers the "mustafar" attention function)
from mustafar.config import MustafarConfig
from mustafar.pruning import prune

__all__ = ["load_model", "list_models", "MustafarConfig", "MustafarCache", "cache_kwargs", "prune", "encode",
           "decode", "ops", "capture", "format"]

__version__ = "0.1.0"

_LAZY = {"load_model": ("mustafar.models", "load_model"),
         "list_models": ("mustafar.models", "list_models"),
         "encode": ("mustafar.format", "encode"),
         "decode": ("mustafar.format", "decode")}
_LAZY_MODULES = ("capture", "format", "models", "eval", "bench", "analysis", "provenance")


def __getattr__(name):  # lazy: models/format/capture pull in extra modules only when used
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"mustafar.{name}")
    raise AttributeError(f"module 'mustafar' has no attribute {name!r}")
