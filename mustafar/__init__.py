"""mustafar: per-token magnitude pruning of the KV cache, a bitmap sparse format, and decode attention
that reads the compressed cache directly (MUSTAFAR, NeurIPS 2025, arXiv 2505.22913).

>>> import mustafar
>>> model, tok = mustafar.load_model("smollm2-135m")                        # doctest: +SKIP
>>> cache = mustafar.MustafarCache(model, mustafar.MustafarConfig(k_sparsity=0.7, v_sparsity=0.7))  # doctest: +SKIP
>>> out = model.generate(**tok("Hi", return_tensors="pt"), past_key_values=cache, max_new_tokens=8)  # doctest: +SKIP

Importing the package registers the ``"mustafar"`` attention/mask functions with transformers
(its only side effect).
"""

from __future__ import annotations

import importlib

from mustafar import attention as _attention  # noqa: F401  (registers the "mustafar" attention function)
from mustafar import ops
from mustafar.cache import MustafarCache, MustafarConfig
from mustafar.pruning import prune

__all__ = ["load_model", "MustafarConfig", "MustafarCache", "prune", "encode", "decode", "ops"]

__version__ = "0.1.0"

_LAZY = {"load_model": ("mustafar.models", "load_model"),
         "encode": ("mustafar.format", "encode"),
         "decode": ("mustafar.format", "decode")}


def __getattr__(name):  # lazy: models/format pull in extra modules only when used
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'mustafar' has no attribute {name!r}")
