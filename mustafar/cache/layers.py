"""Cache layers of :class:`mustafar.MustafarCache`: the schedule (window, chunked compression) and two stores.

Schedule (identical in both modes, so ``"simulate"`` is the exact dense twin of ``"compressed"``):

* Every layer keeps the most recent tokens dense (the *window*). Older tokens are pruned per token
  vector (K with ``k_strategy`` at ``k_sparsity``, V with ``v_strategy`` at ``v_sparsity``) and, in
  ``"compressed"`` mode, encoded in the bitmap format (:mod:`mustafar.format`).
* :meth:`MustafarLayerBase.prefill` (a call with ``q_len > 1``: the prompt, a second turn, chunked
  prefill) attends densely: it sees the past as stored (compressed rows decoded for that call only,
  the window as is) plus its own tokens unpruned. Afterwards everything but the last
  ``local_window`` tokens is pruned/compressed. For the first call that is the paper's "dense
  attention over the prompt, then compress"; a later multi-token call decodes the whole
  compressed part once (the slow path).
* :meth:`MustafarLayerBase.decode_step` (``q_len == 1``) appends the token to the window; when the
  window then holds more than ``local_window + compress_chunk`` tokens, its ``compress_chunk``
  oldest tokens are pruned and appended to the compressed store. Attention then runs over
  ``[compressed ; window]`` through :func:`mustafar.ops.sparse_decode` (compressed mode, via the
  handoff note) or dense sdpa (simulate mode).

Query-driven strategies (``output_aware``, ``think``) are scored by :class:`mustafar.cache.scoring.QueryScores`
with the post-RoPE queries the ``"mustafar"`` attention function hands back (:meth:`consume_queries`).
A multi-token call is pruned after its dense attention, exactly as
``mustafar.prune(x, s, strategy, q=q, ...)`` on the call's K/V and queries would prune those rows.
A decode-time chunk is scored with the queries that arrived before it is compressed (the query of
the step that compresses it is not yet known). In ``"compressed"`` mode the decode step's attention
weights on the window come from a softmax over the dense window only (the compressed part's
normaliser is not exposed by ``sparse_decode``): per query a common factor, which leaves per-token
rankings unchanged; ``"simulate"`` uses the full softmax. ThinK fixes its channel set at the last
multi-token call and reuses it for later decode-time chunks, as ThinK does. Code that replays a
prefill with ``cache.update`` (no attention call) passes the queries as
``cache.update(k, v, layer_idx, {"query_states": q})``.

Memory of one compressed layer (``B`` batch, ``H`` KV heads, ``W = D // 64``): ``k_bitmap``/``v_bitmap``
int64 ``[B, H, cap, W]``, ``k_values [B, H, cap, k_k]``, ``v_values [B, H, cap, k_v]``, the dense window
``[B, H, wcap_now, D]`` for K and V and an int64 ``[2]`` counter. Appends write rows after the last used
row; nothing stored is rewritten. Capacities (what :meth:`mustafar.MustafarCache.nbytes` counts):

* without ``max_cache_len``: the window buffer holds the window rounded up to 16 rows (it grows in
  16-row steps and is re-allocated at its new size after each compression); the store grows when
  full to ``max(needed, min(2*cap, needed * dense_row / sparse_row))`` rows, rounded up to 8: at most
  the bytes ``needed`` dense rows would take, so the whole layer never holds more than a
  ``DynamicCache`` of the same tokens plus < 16 window rows and 8 store rows (for sparsities whose
  bitmap row is smaller than a dense row, see :func:`mustafar.format.format_bytes`).
* with ``max_cache_len = L``: preallocated at ``round8(max(0, L - local_window))`` store rows and
  ``min(L, local_window + compress_chunk + 1)`` window rows (a ``StaticCache``-style fixed footprint,
  never re-allocated while the sequence stays within ``L``).

``cap`` is always a multiple of 8 rows, so every ``(batch, head)`` slice of the store starts 16-byte
aligned for any ``k`` (the CUDA kernels stage it with 16-byte copies).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from mustafar import format as fmt
from mustafar.cache.handoff import Note
from mustafar.cache.scoring import QueryScores
from mustafar.config import QUERY_STRATEGIES
from mustafar.pruning import prune

__all__ = ["MustafarLayerBase", "UnsupportedOps", "round_up"]

_WINDOW_STEP = 16  # window buffers grow / shrink in steps of this many rows (no max_cache_len)


def round_up(n: int, m: int = 8) -> int:
    """``n`` rounded up to a multiple of ``m`` (store rows: 8, so slices stay 16-byte aligned)."""
    return -(-int(n) // m) * m


class UnsupportedOps:
    """The ``CacheLayerMixin`` operations no MustafarCache layer supports (clear errors), shared by the eager
    layers and :class:`mustafar.cache.static.MustafarStaticLayer`."""

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MustafarCache cannot be cropped (pruned tokens cannot be restored)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("MustafarCache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("MustafarCache does not support batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("MustafarCache does not support batch_select_indices")

    def offload(self):
        raise NotImplementedError("MustafarCache does not support offloading")

    def prefetch(self):
        pass


class MustafarLayerBase(UnsupportedOps, CacheLayerMixin):
    """Schedule shared by both modes; subclasses implement the storage."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cfg, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 max_cache_len: int | None = None, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.max_cache_len = max_cache_len
        self.max_positions = max_positions  # uniform sliding-window models: the window must not be exceeded
        self.wcap = cfg.local_window + cfg.compress_chunk + 1  # most rows the window ever holds
        self.n_c = 0  # tokens pruned (compressed)
        self.n_w = 0  # tokens in the dense window
        self.counts: torch.Tensor | None = None  # int64 [2] = (n_c, n_w), the on-device bookkeeping
        # query-driven strategies: scoring state, and a multi-token call's K/V awaiting its queries
        self._qs = QueryScores(cfg, head_dim) if (cfg.needs_queries("k") or cfg.needs_queries("v")) else None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.note: Note | None = None  # what the last update leaves for attention (taken by MustafarCache)

    # -- CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch_size = key_states.shape[0]
        self.counts = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._allocate(key_states.shape[0], key_states.device)
        if self._qs is not None:
            self._qs.allocate(key_states.shape[0], self.num_kv_heads, key_states.device)
        self.is_initialized = True

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(
                f"key/value states must be [B, H_kv, T, D] of equal shape, got {tuple(key_states.shape)} "
                f"and {tuple(value_states.shape)}"
            )
        b, h, _, d = key_states.shape
        if h != self.num_kv_heads or d != self.head_dim:
            raise ValueError(
                f"this MustafarCache was built for H_kv={self.num_kv_heads}, head_dim={self.head_dim}; got "
                f"H_kv={h}, head_dim={d} (a cache cannot be reused across models of another shape)"
            )
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise ValueError(
                f"this MustafarCache was built for dtype {self.dtype}; got key/value dtype "
                f"{key_states.dtype}/{value_states.dtype}"
            )
        if self.is_initialized:
            if b != self.batch_size:
                raise ValueError(f"batch size {b} != the cache's batch size {self.batch_size}; call cache.reset()")
            if key_states.device != self.device:
                raise ValueError(f"key states on {key_states.device}, cache on {self.device}")
        if self.max_positions is not None and self.get_seq_length() + key_states.shape[2] > self.max_positions:
            raise ValueError(
                f"sequence length {self.get_seq_length() + key_states.shape[2]} exceeds the model's sliding window "
                f"{self.max_positions}: MustafarCache supports uniform sliding-window models only within the window"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Add ``key_states, value_states [B, H_kv, q_len, D]``; return the K/V attention should read.

        ``q_len == 1`` is a :meth:`decode_step`, anything longer a :meth:`prefill`. Query-driven
        strategies: a multi-token call's pruning waits for its queries, which the ``"mustafar"``
        attention function hands over (:meth:`consume_queries`); code that calls ``update`` without
        running attention passes them as ``cache_kwargs={"query_states": q}`` (``q [B, H_q, q_len, D]``
        post-RoPE).
        """
        if self._pending is not None:
            raise RuntimeError(
                "MustafarCache layer: the previous multi-token call never received its queries (query-driven "
                f"k_strategy={self.cfg.k_strategy!r} / v_strategy={self.cfg.v_strategy!r}); run attention through "
                "the 'mustafar' attention implementation or pass cache_kwargs={'query_states': q} to update()"
            )
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.note = None
        if key_states.shape[2] == 1:
            out = self.decode_step(key_states, value_states)
        else:
            ck = kwargs.get("cache_kwargs", args[0] if args else None)
            q = ck.get("query_states") if isinstance(ck, dict) else None
            out = self.prefill(key_states, value_states, q)
        self.counts[0] = self.n_c
        self.counts[1] = self.n_w
        return out

    def decode_step(self, k: torch.Tensor, v: torch.Tensor):
        """Append one token ``[B, H, 1, D]``; compress the window's oldest chunk when it is full."""
        cfg = self.cfg
        self._append_window(k, v)
        if self.n_w > cfg.local_window + cfg.compress_chunk:
            self._compress_window_head(cfg.compress_chunk)
        keys, values, store = self._decode_view()
        if store is not None or self._qs is not None:
            self.note = Note(layer=self if self._qs is not None else None, key=keys, store=store)
        return keys, values

    def prefill(self, k: torch.Tensor, v: torch.Tensor, query_states: torch.Tensor | None = None):
        """A multi-token call ``[B, H, q, D]``: dense K/V for its attention, then prune all but the window."""
        out = self._dense_with(k, v)
        if self._qs is None:
            self._append_bulk(k, v)
            return out
        self._pending = (k, v)
        if query_states is not None:
            self.consume_queries(query_states, out[0], None, None)
        else:
            self.note = Note(layer=self, key=out[0])
        return out

    def consume_queries(self, query: torch.Tensor, key: torch.Tensor, attention_mask=None,
                        scaling: float | None = None, key_pos0: int | None = None) -> None:
        """Receive the queries of the call that just ran (called by :mod:`mustafar.cache.attention`).

        Parameters
        ----------
        query : ``[B, H_q, q_len, D]`` post-RoPE queries of this call.
        key : ``[B, H_kv, T_k, D]`` the keys attention read: the whole sequence (multi-token call, slow
            path, simulate mode), or only the dense window (compressed decode fast path).
        attention_mask : ``None`` | int32 ``kv_start [B]`` | 4D sdpa mask, as given to attention.
        scaling : softmax scale (default ``D**-0.5``).
        key_pos0 : cache position of ``key``'s first row (default: ``get_seq_length() - T_k``).
        """
        if scaling is None:
            scaling = self.head_dim ** -0.5
        b, h = key.shape[:2]
        if (query.dim() != 4 or query.shape[0] != b or query.shape[1] % h or query.shape[-1] != self.head_dim):
            raise ValueError(f"query_states shape {tuple(query.shape)} does not fit keys {tuple(key.shape)} "
                             f"(expected [B={b}, H_q (multiple of {h}), q_len, D={self.head_dim}])")
        if self._pending is not None:
            k, v = self._pending
            if query.shape[2] != k.shape[2]:
                raise ValueError(f"query_states has q_len={query.shape[2]}, the pending call added {k.shape[2]} tokens")
            self._pending = None
            wk, wv = self._window_rows()
            tail_k = torch.cat([wk, k], dim=2)  # [B, H, n_w + q, D]
            tail_v = torch.cat([wv, v], dim=2)
            n_comp = max(0, tail_k.shape[2] - self.cfg.local_window)
            km, vm = self._qs.bulk(tail_k, tail_v, self.n_w, query, key, attention_mask, scaling, n_comp)
            self._append_bulk(k, v, km, vm)
            self.counts[0] = self.n_c
            self.counts[1] = self.n_w
        elif query.shape[2] == 1:
            if key_pos0 is None:
                key_pos0 = self.get_seq_length() - key.shape[2]
            self._qs.observe(query, key, attention_mask, scaling, key_pos0, self.n_w)

    def _chunk_masks(self, n: int):
        """Keep-masks of the ``n`` oldest window rows (query-driven sides; ``None`` otherwise); shifts the state."""
        if self._qs is None:
            return None, None
        wk, wv = self._window_rows()
        qs = self._qs
        km, vm = qs.masks(wk[:, :, :n], wv[:, :, :n], None if qs.qacc is None else qs.qacc[:, :, :n],
                          None if qs.vacc is None else qs.vacc[:, :, :n])
        qs.shift(n, self.n_w)
        return km, vm

    # -- pruning policy of the sides without queries (or with them at sparsity 0)
    def _plain(self, which: str) -> bool:
        strat = getattr(self.cfg, f"{which}_strategy")
        return strat == "per_token_magnitude" or strat in QUERY_STRATEGIES  # query-driven: only at sparsity 0

    def _prune_dense(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """Pruned copy of ``x [B, H, T, D]`` (pruned entries 0), as the simulate mode stores it."""
        if getattr(self.cfg, f"{which}_sparsity") == 0.0 and self._plain(which):
            return x
        return prune(x, getattr(self.cfg, f"{which}_sparsity"), getattr(self.cfg, f"{which}_strategy"),
                     **getattr(self.cfg, f"{which}_strategy_kwargs"))

    def _encode(self, which: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> fmt.SparseKV:
        """Prune (with ``mask`` where given, else the side's strategy) and encode ``x [B, H, n, D]``."""
        x = x.contiguous()
        s = getattr(self.cfg, f"{which}_sparsity")
        vdt = self.cfg.value_dtype(which)
        if mask is None and self._plain(which):
            return fmt.encode_topk(x, s, value_dtype=vdt)
        if mask is None:
            _, mask = prune(x, s, getattr(self.cfg, f"{which}_strategy"), return_mask=True,
                            **getattr(self.cfg, f"{which}_strategy_kwargs"))
        sp = fmt.encode(x, mask, self.cfg.kept(which, self.head_dim))
        if vdt is None:
            return sp
        q8, sc = fmt.quantize_fp8(sp.values)
        return fmt.SparseKV(sp.bitmap, q8, self.head_dim, scale=sc)

    # -- Cache API
    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self, *args) -> int:
        return self.n_c + self.n_w + (self._pending[0].shape[2] if self._pending is not None else 0)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.n_c = self.n_w = 0
        self.is_initialized = False
        self.counts = None
        self._pending = None
        self.note = None
        if self._qs is not None:
            self._qs.free()
        self._free()


    # -- capacities
    def _window_capacity(self, needed: int) -> int:
        """Rows of a window buffer that must hold ``needed`` rows (see the module docstring)."""
        if needed > self.wcap:
            raise RuntimeError(f"mustafar: window of {needed} rows exceeds its capacity {self.wcap} (internal error)")
        if self.max_cache_len is not None:
            return max(needed, min(self.wcap, self.max_cache_len))
        return min(self.wcap, round_up(max(needed, 1), _WINDOW_STEP))

    def _store_capacity(self, current: int, needed: int, dense_row: int, sparse_row: int) -> int:
        """Rows of a store that must hold ``needed`` rows, growing from ``current``."""
        if self.max_cache_len is not None and needed <= self.max_cache_len:
            return max(round_up(max(0, self.max_cache_len - self.cfg.local_window)), round_up(needed), current)
        bounded = (needed * dense_row) // max(1, sparse_row)  # never more bytes than `needed` dense rows
        return round_up(max(needed, min(2 * current, bounded)))

    # -- storage API of the subclasses
    def _allocate(self, batch: int, device) -> None: ...
    def _free(self) -> None: ...
    def _append_window(self, k, v) -> None: ...
    def _compress_window_head(self, n: int) -> None: ...
    def _decode_view(self): ...
    def _dense_with(self, k, v): ...
    def _append_bulk(self, k, v, km=None, vm=None) -> None: ...
    def _window_rows(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer holds, by role."""
        return {}
