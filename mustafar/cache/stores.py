"""The two storages of the cache schedule: bitmap-compressed (:class:`MustafarLayer`) and its dense twin.

The schedule (window, chunked compression, query-driven scoring) is :class:`mustafar.cache.layers.MustafarLayerBase`;
capacities are explained in :mod:`mustafar.cache.layers`.
"""

from __future__ import annotations

import torch

from mustafar import format as fmt
from mustafar import ops
from mustafar.cache.layers import MustafarLayerBase, round_up

__all__ = ["MustafarLayer", "MustafarSimulatedLayer"]


def _grown(old: torch.Tensor, rows: int, used: int) -> torch.Tensor:
    """A ``[B, H, rows, *]`` buffer holding ``old``'s first ``used`` rows (zeros after them)."""
    new = old.new_zeros(old.shape[0], old.shape[1], rows, old.shape[3])
    new[:, :, :used] = old[:, :, :used]
    return new


class MustafarLayer(MustafarLayerBase):
    """Compressed layer: bitmap store ``[B, H, cap, *]`` + dense window ``[B, H, <= local_window + compress_chunk + 1, D]``."""

    def _allocate(self, batch, device):
        d, h = self.head_dim, self.num_kv_heads
        self.W = d // 64
        self.kk = self.cfg.kept("k", d)
        self.kv = self.cfg.kept("v", d)
        it = self.dtype.itemsize
        self._dense_row = 2 * d * it  # K + V bytes of one dense token (per head)
        self._sparse_row = sum(fmt.format_bytes(d, getattr(self.cfg, f"{w}_sparsity"), self.dtype,
                                                self.cfg.value_dtype(w)) for w in ("k", "v"))
        cap = self._store_capacity(0, 0, self._dense_row, self._sparse_row) if self.max_cache_len else 0
        self.cap = cap
        self.k_bitmap = torch.zeros(batch, h, cap, self.W, dtype=torch.int64, device=device)
        self.v_bitmap = torch.zeros(batch, h, cap, self.W, dtype=torch.int64, device=device)
        self.k_vals = torch.zeros(batch, h, cap, self.kk, dtype=self.cfg.value_dtype("k") or self.dtype, device=device)
        self.v_vals = torch.zeros(batch, h, cap, self.kv, dtype=self.cfg.value_dtype("v") or self.dtype, device=device)
        # fp8 sides: one float16 scale per token vector (mustafar.format.quantize_fp8)
        self.k_scale = (torch.ones(batch, h, cap, dtype=torch.float16, device=device)
                        if self.cfg.value_dtype("k") is not None else None)
        self.v_scale = (torch.ones(batch, h, cap, dtype=torch.float16, device=device)
                        if self.cfg.value_dtype("v") is not None else None)
        w0 = self._window_capacity(0) if self.max_cache_len else 0
        self.k_win = torch.zeros(batch, h, w0, d, dtype=self.dtype, device=device)
        self.v_win = torch.zeros(batch, h, w0, d, dtype=self.dtype, device=device)
        self._sync_kv()

    def _resize_window(self, rows: int, used: int):
        """Window buffers of ``rows`` rows holding the first ``used`` current rows."""
        self.k_win = _grown(self.k_win, rows, used)
        self.v_win = _grown(self.v_win, rows, used)

    def _ensure_window(self, needed: int):
        if needed > self.k_win.shape[2]:
            self._resize_window(self._window_capacity(needed), self.n_w)

    def _free(self):
        for n in ("k_bitmap", "v_bitmap", "k_vals", "v_vals", "k_scale", "v_scale", "k_win", "v_win"):
            setattr(self, n, None)
        self.keys = self.values = None

    def _sync_kv(self):
        # `keys`/`values` (the CacheLayerMixin fields) show the dense window, for code that peeks at them.
        self.keys = self.k_win[:, :, : self.n_w]
        self.values = self.v_win[:, :, : self.n_w]

    def tensors(self):
        if not self.is_initialized:
            return {}
        scales = {f"{w}_scales": t for w, t in (("k", self.k_scale), ("v", self.v_scale)) if t is not None}
        return {"k_bitmap": self.k_bitmap, "v_bitmap": self.v_bitmap, "k_values": self.k_vals,
                "v_values": self.v_vals, **scales, "k_window": self.k_win, "v_window": self.v_win,
                "counts": self.counts, **(self._qs.tensors() if self._qs is not None else {})}

    def _reserve(self, n_new: int):
        """Make room for ``n_new`` more compressed rows (growth copies the used rows once)."""
        needed = self.n_c + n_new
        if needed <= self.cap:
            return
        cap = self._store_capacity(self.cap, needed, self._dense_row, self._sparse_row)
        for name in ("k_bitmap", "v_bitmap", "k_vals", "v_vals"):
            setattr(self, name, _grown(getattr(self, name), cap, self.n_c))
        for name in ("k_scale", "v_scale"):
            if getattr(self, name) is not None:
                new = getattr(self, name).new_ones(self.batch_size, self.num_kv_heads, cap)
                new[:, :, : self.n_c] = getattr(self, name)[:, :, : self.n_c]
                setattr(self, name, new)
        self.cap = cap

    def _store(self, k: torch.Tensor, v: torch.Tensor, km=None, vm=None):
        """Prune + encode ``k, v [B, H, n, D]`` (with keep-masks ``km``/``vm`` where given) after the last used row."""
        n = k.shape[2]
        if n == 0:
            return
        self._reserve(n)
        ks, vs = self._encode("k", k, km), self._encode("v", v, vm)
        sl = slice(self.n_c, self.n_c + n)
        self.k_bitmap[:, :, sl] = ks.bitmap
        self.k_vals[:, :, sl] = ks.values
        self.v_bitmap[:, :, sl] = vs.bitmap
        self.v_vals[:, :, sl] = vs.values
        if ks.scale is not None:
            self.k_scale[:, :, sl] = ks.scale
        if vs.scale is not None:
            self.v_scale[:, :, sl] = vs.scale
        self.n_c += n

    def _append_window(self, k, v):
        self._ensure_window(self.n_w + 1)
        self.k_win[:, :, self.n_w : self.n_w + 1] = k
        self.v_win[:, :, self.n_w : self.n_w + 1] = v
        self.n_w += 1
        self._sync_kv()

    def _window_rows(self):
        return self.k_win[:, :, : self.n_w], self.v_win[:, :, : self.n_w]

    def _set_window(self, k_rows: torch.Tensor, v_rows: torch.Tensor):
        """Make ``k_rows, v_rows [B, H, n, D]`` (copies) the whole window."""
        n = k_rows.shape[2]
        rows = self._window_capacity(n)
        if rows != self.k_win.shape[2]:  # grow, or shrink back after a compression (no max_cache_len)
            self.k_win = k_rows.new_zeros(k_rows.shape[0], k_rows.shape[1], rows, k_rows.shape[3])
            self.v_win = torch.zeros_like(self.k_win)
        else:
            k_rows, v_rows = k_rows.clone(), v_rows.clone()  # may alias the window buffer
        self.k_win[:, :, :n] = k_rows
        self.v_win[:, :, :n] = v_rows
        self.k_win[:, :, n:] = 0
        self.v_win[:, :, n:] = 0
        self.n_w = n
        self._sync_kv()

    def _compress_window_head(self, n):
        km, vm = self._chunk_masks(n)
        self._store(self.k_win[:, :, :n], self.v_win[:, :, :n], km, vm)
        self._set_window(self.k_win[:, :, n : self.n_w], self.v_win[:, :, n : self.n_w])

    def _decode_view(self):
        keys, values = self.k_win[:, :, : self.n_w], self.v_win[:, :, : self.n_w]  # fresh views each step
        store = dict(k_bitmap=self.k_bitmap[:, :, : self.n_c], k_values=self.k_vals[:, :, : self.n_c],
                     v_bitmap=self.v_bitmap[:, :, : self.n_c], v_values=self.v_vals[:, :, : self.n_c],
                     k_window=keys, v_window=values, head_dim=self.head_dim,
                     k_scale=None if self.k_scale is None else self.k_scale[:, :, : self.n_c],
                     v_scale=None if self.v_scale is None else self.v_scale[:, :, : self.n_c],
                     kernel=self.cfg.decode_kernel if keys.device.type == "cuda" else "auto")  # CPU: one C++ kernel
        return keys, values, store

    def _past_dense(self):
        n, d = self.n_c, self.head_dim
        out = []
        for bm, vals, sc in ((self.k_bitmap, self.k_vals, self.k_scale), (self.v_bitmap, self.v_vals, self.v_scale)):
            sp = fmt.SparseKV(bm[:, :, :n], vals[:, :, :n], d, scale=None if sc is None else sc[:, :, :n])
            out.append(fmt.decode(sp, dtype=self.dtype))
        return out[0], out[1]

    def _dense_with(self, k, v):
        if self.n_c == 0 and self.n_w == 0:
            return k, v
        pk, pv = self._past_dense() if self.n_c else (k[:, :, :0], v[:, :, :0])
        return (torch.cat([pk, self.k_win[:, :, : self.n_w], k], dim=2),
                torch.cat([pv, self.v_win[:, :, : self.n_w], v], dim=2))

    def _append_bulk(self, k, v, km=None, vm=None):
        tail_k = torch.cat([self.k_win[:, :, : self.n_w], k], dim=2)  # [B, H, n_w + q, D]
        tail_v = torch.cat([self.v_win[:, :, : self.n_w], v], dim=2)
        n_comp = max(0, tail_k.shape[2] - self.cfg.local_window)
        self._store(tail_k[:, :, :n_comp], tail_v[:, :, :n_comp], km, vm)
        self._set_window(tail_k[:, :, n_comp:], tail_v[:, :, n_comp:])


class MustafarSimulatedLayer(MustafarLayerBase):
    """Simulate layer: dense ``[B, H, cap, D]`` K/V where tokens outside the window are pruned (zeroed) in place."""

    def _allocate(self, batch, device):
        d, h = self.head_dim, self.num_kv_heads
        self.cap = round_up(self.max_cache_len or 0)
        self.k_buf = torch.zeros(batch, h, self.cap, d, dtype=self.dtype, device=device)
        self.v_buf = torch.zeros(batch, h, self.cap, d, dtype=self.dtype, device=device)
        self._sync_kv()

    def _free(self):
        self.k_buf = self.v_buf = None
        self.keys = self.values = None

    def _sync_kv(self):
        n = self.n_c + self.n_w
        self.keys = self.k_buf[:, :, :n]
        self.values = self.v_buf[:, :, :n]

    def tensors(self):
        if not self.is_initialized:
            return {}
        return {"k_dense": self.k_buf, "v_dense": self.v_buf, "counts": self.counts,
                **(self._qs.tensors() if self._qs is not None else {})}

    def _reserve(self, n_new):
        n = self.n_c + self.n_w
        if n + n_new <= self.cap:
            return
        if self.max_cache_len is not None and n + n_new <= self.max_cache_len:
            cap = round_up(self.max_cache_len)
        else:
            cap = round_up(max(n + n_new, 2 * self.cap, 64))
        self.k_buf = _grown(self.k_buf, cap, n)
        self.v_buf = _grown(self.v_buf, cap, n)
        self.cap = cap

    def _prune_rows(self, start, n, km=None, vm=None):
        if n <= 0:
            return
        sl = slice(start, start + n)
        zero = torch.zeros((), dtype=self.dtype, device=self.k_buf.device)
        for buf, which, m in ((self.k_buf, "k", km), (self.v_buf, "v", vm)):
            rows = buf[:, :, sl].clone()
            rows = self._prune_dense(which, rows) if m is None else torch.where(m, rows, zero)
            if self.cfg.value_dtype(which) is not None:  # the compressed mode's fp8 values, dequantized
                q8, sc = fmt.quantize_fp8(rows)  # zeros (pruned) stay 0; the amax is the kept values'
                rows = (q8.float() * sc.float()[..., None]).to(self.dtype)
            buf[:, :, sl] = rows

    def _window_rows(self):
        sl = slice(self.n_c, self.n_c + self.n_w)
        return self.k_buf[:, :, sl], self.v_buf[:, :, sl]

    def _append_window(self, k, v):
        self._reserve(1)
        n = self.n_c + self.n_w
        self.k_buf[:, :, n : n + 1] = k
        self.v_buf[:, :, n : n + 1] = v
        self.n_w += 1
        self._sync_kv()

    def _compress_window_head(self, n):
        km, vm = self._chunk_masks(n)
        self._prune_rows(self.n_c, n, km, vm)
        self.n_c += n
        self.n_w -= n

    def _decode_view(self):
        self._sync_kv()
        return self.keys, self.values, None

    def _dense_with(self, k, v):
        n = self.n_c + self.n_w
        if n == 0:
            return k, v
        return torch.cat([self.k_buf[:, :, :n], k], dim=2), torch.cat([self.v_buf[:, :, :n], v], dim=2)

    def _append_bulk(self, k, v, km=None, vm=None):
        q = k.shape[2]
        self._reserve(q)
        n = self.n_c + self.n_w
        self.k_buf[:, :, n : n + q] = k
        self.v_buf[:, :, n : n + q] = v
        t = self.n_w + q
        n_comp = max(0, t - self.cfg.local_window)
        self._prune_rows(self.n_c, n_comp, km, vm)
        self.n_c += n_comp
        self.n_w = t - n_comp
        self._sync_kv()
