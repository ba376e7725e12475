"""The handoff between a cache layer's ``update`` and the ``"mustafar"`` attention call of the same layer.

transformers calls ``cache.update(k, v, layer_idx)`` and then the attention function with whatever
``update`` returned; the attention function sees the attention module, not the cache. A compressed
decode step must still reach the compressed store, and a query-driven strategy must get the call's
queries back. :class:`Handoff` is that channel: one object per model (created by
:func:`mustafar.cache.attention.prepare_model`, shared by every :class:`mustafar.MustafarCache` built
for that model, reachable from each attention module), with one slot per layer that lives only
between ``update`` and attention of that layer:

* ``post(layer_idx, note)`` in ``update``; ``take(layer_idx, key)`` in attention (the note is
  returned only if ``key`` is the very tensor ``update`` returned, so a model that transforms the
  keys in between is detected instead of silently ignoring the store);
* a decode-step note nobody took means the attention did not run through ``"mustafar"`` (another
  attention implementation was set, the cache is used with a model it was not built for, or the
  previous forward raised between ``update`` and attention): the same cache's next ``post`` or
  :meth:`check` raises. Stale notes of another cache, and notes without a store (query-driven
  prefills, whose layer reports missing queries itself), are dropped silently.
* code that calls ``update`` without running attention (replaying K/V, filling a cache with random
  K/V) drops the notes afterwards: :meth:`mustafar.MustafarCache.discard_handoff`.

Nothing is attached to tensors and there is no process-global state: two caches used alternately
with one model, or two models with their caches, cannot see each other's notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Handoff", "Note"]


@dataclass
class Note:
    """What one layer's ``update`` leaves for its attention call.

    Attributes
    ----------
    layer : the cache layer (for query-driven strategies: it receives the queries), or ``None``.
    owner : the cache that posted it (set by :meth:`Handoff.post`).
    key : the key tensor ``update`` returned (identity-checked by :meth:`Handoff.take`).
    store : for a compressed decode step, the compressed views (``k_bitmap``, ``k_values``, ``v_bitmap``,
        ``v_values``, ``k_window``, ``v_window``, ``head_dim``, ``kernel``) as a dict; else ``None``.
    """

    layer: Any
    key: torch.Tensor
    store: dict | None = None
    owner: Any = None


class Handoff:
    """Per-model slots ``layer_idx -> Note`` (see the module docstring)."""

    def __init__(self):
        self._slots: dict[int, Note] = {}

    def post(self, layer_idx: int, note: Note, owner) -> None:
        note.owner = owner
        stale = sorted(i for i, n in self._slots.items() if n.store is not None and n.owner is owner)
        self._slots.clear()
        if stale:
            self._raise(stale)
        self._slots[layer_idx] = note

    def take(self, layer_idx, key: torch.Tensor) -> Note | None:
        """The note of ``layer_idx`` (removed), ``None`` if none; raises if ``key`` is not the posted tensor."""
        note = self._slots.pop(layer_idx, None)
        if note is not None and note.key is not key and note.store is not None:
            raise RuntimeError(
                f"layer {layer_idx}: the model changed the keys between cache.update and attention, so the "
                "compressed part of the MustafarCache would be ignored; this model is not supported in "
                "mode='compressed'"
            )
        return note

    def check(self, owner) -> None:
        """Raise if a decode-step note of ``owner`` was never taken (attention did not run through ``"mustafar"``)."""
        stale = sorted(i for i, n in self._slots.items() if n.store is not None and n.owner is owner)
        if stale:
            self.clear(owner)
            self._raise(stale)

    def clear(self, owner=None) -> None:
        """Drop every note (of ``owner`` only, when given)."""
        for i in [i for i, n in self._slots.items() if owner is None or n.owner is owner]:
            del self._slots[i]

    @staticmethod
    def _raise(idx) -> None:
        raise RuntimeError(
            f"MustafarCache: layer(s) {idx} were updated but their attention did not run through the "
            "'mustafar' attention implementation (the model's attn_implementation was changed after the "
            "cache was built, the cache is used with a model it was not built for, or the previous forward "
            "raised before its attention ran); build the MustafarCache for this model, keep "
            "attn_implementation='mustafar', and after replaying K/V with update() call cache.discard_handoff()"
        )
