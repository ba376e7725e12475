"""The transformers-facing cache: :class:`MustafarCache` and the parts it is built from.

=============== ==============================================================================
module          job
=============== ==============================================================================
cache.py        ``MustafarCache`` (model checks, per-layer choice, handoff posting, byte accounting)
layers.py       the schedule of one layer: ``prefill()`` / ``decode_step()``, window + chunked compression
stores.py       the two storages: bitmap-compressed (``MustafarLayer``) and its dense twin (simulate)
scoring.py      running query statistics for the query-driven strategies (formulas in ``mustafar.pruning``)
attention.py    the registered ``"mustafar"`` attention + mask functions, ``prepare_model``
handoff.py      the per-model channel from ``update`` to the attention call (no tensor attributes, no globals)
=============== ==============================================================================
"""

from mustafar.cache.cache import MustafarCache, cache_kwargs, model_geometry, preallocated_layer_nbytes
from mustafar.cache.stores import MustafarLayer, MustafarSimulatedLayer
from mustafar.config import MustafarConfig

__all__ = ["MustafarCache", "MustafarConfig", "MustafarLayer", "MustafarSimulatedLayer", "cache_kwargs",
           "model_geometry", "preallocated_layer_nbytes"]
