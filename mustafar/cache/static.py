"""The compileable compressed layer: :class:`MustafarStaticLayer` (``MustafarCache(..., max_cache_len=L)``).

A decode step of this layer is a fixed sequence of device work with no host synchronisation and no
Python branching on data, so ``torch.compile`` can trace it and ``mode="reduce-overhead"`` can replay it
as a CUDA graph (what transformers' ``StaticLayer`` does for a dense cache):

* every buffer is preallocated at ``lazy_initialization`` and updated in place; their addresses are
  marked static (``torch._dynamo.mark_static_address``);
* the lengths live on the device: ``lengths`` int32 ``[2] = (n_c, n_w)`` (compressed rows, window rows)
  and ``seq`` int64 ``[]`` (tokens held, what :meth:`get_seq_length` returns, as ``StaticLayer``);
* one decode step is one :func:`mustafar.ops.append_decode` (the token into the dense window ring; the
  token that leaves the ``local_window`` most recent ones pruned, encoded and quantized into its store
  row; the lengths advanced) and one :func:`mustafar.ops.sparse_decode` with ``lengths=`` (the kernel
  reads the visible lengths from device memory; the launch is sized for the capacity).

Layout (``B`` batch, ``H`` KV heads, ``W = D // 64``): the store holds token position ``p`` in row ``p``:
``k_bitmap/v_bitmap`` int64 ``[B, H, C, W]``, ``k_values [B, H, C, k_k]``, ``v_values [B, H, C, k_v]``
(model dtype, or ``float8_e4m3fn`` with ``k_scale``/``v_scale`` float16 ``[B, H, C]``), with
``C = round32(max(1, L - local_window))`` rows (a token at position ``>= L - local_window`` never leaves
the window); the window is a ring ``k_window/v_window [B, H, R, D]`` with ``R = local_window +
compress_chunk + 1`` (window row ``i`` at slot ``(n_c + i) % R``). Every value buffer is followed by 32
bytes of slack (the CUDA kernel's row loads may read past a row end).

Schedule: the same as :class:`mustafar.cache.stores.MustafarLayer` (``simulate`` mode is the exact twin):
a multi-token call attends densely to the past (compressed rows decoded for that call) and its own tokens,
then everything but the last ``local_window`` tokens is compressed; decode steps grow the window until it
holds ``local_window + compress_chunk + 1`` tokens and then make its oldest ``compress_chunk`` visible as
compressed. Tokens are encoded one per step as they leave the ``local_window`` most recent ones (the
encoding of a token does not depend on when it is done: per-token magnitude / 2:4 pruning and fp8
quantization look at that token vector only), so the chunked visibility costs no burst of work.

Multi-token calls (the prompt, later turns) run eagerly and read the lengths on the host; only the
one-token decode step is meant to be compiled. What cannot be compiled raises when asked: query-driven
strategies (``output_aware``, ``think``) score pruning with later queries and use the eager layer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from mustafar import format as fmt
from mustafar import ops
from mustafar.cache.handoff import Note
from mustafar.cache.layers import UnsupportedOps, round_up

__all__ = ["MustafarStaticLayer", "static_layer_nbytes", "static_capable", "SLACK_BYTES"]

SLACK_BYTES = 32  # readable bytes after each value buffer (csrc/cuda/decode_v7.cuh reads up to 20 past a row)


def static_capable(cfg) -> bool:
    """Whether ``cfg`` can use the compileable layer: compressed mode with per-token magnitude pruning on both sides
    (the one-token encoder of :func:`mustafar.ops.append_decode` is per-token top-k; 2:4 and the query-driven
    strategies use the eager layer)."""
    return cfg.mode == "compressed" and cfg.k_strategy == cfg.v_strategy == "per_token_magnitude"


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except Exception:  # noqa: BLE001 - older torch
        return False


def _with_slack(shape, dtype, device) -> torch.Tensor:
    """A zero tensor of ``shape`` whose storage has :data:`SLACK_BYTES` more bytes after it."""
    n = 1
    for s in shape:
        n *= int(s)
    it = torch.empty((), dtype=dtype).element_size()
    buf = torch.zeros(n * it + SLACK_BYTES, dtype=torch.uint8, device=device)
    return buf[: n * it].view(dtype).view(*shape)


def _layout(cfg, head_dim: int, max_cache_len: int) -> tuple[int, int]:
    """(store rows C, window ring rows R) of a static layer."""
    rows = round_up(max(1, max_cache_len - cfg.local_window), 32)
    ring = cfg.local_window + cfg.compress_chunk + 1
    return rows, ring


def static_layer_nbytes(cfg, batch: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        max_cache_len: int) -> int:
    """Bytes one :class:`MustafarStaticLayer` holds (every tensor, slack and counters included)."""
    rows, ring = _layout(cfg, head_dim, max_cache_len)
    w, it = head_dim // 64, dtype.itemsize
    per_row = 0
    for which in ("k", "v"):
        vdt = cfg.value_dtype(which)
        k = cfg.kept(which, head_dim)
        per_row += 8 * w + k * (1 if vdt is not None else it) + (2 if vdt is not None else 0)
    bh = batch * num_kv_heads
    return bh * (rows * per_row + 2 * ring * head_dim * it) + 2 * SLACK_BYTES + 4 * 2 + 8


class MustafarStaticLayer(UnsupportedOps, CacheLayerMixin):
    """Preallocated, compileable compressed layer (module docstring)."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, cfg, num_kv_heads: int, head_dim: int, dtype: torch.dtype, max_cache_len: int,
                 max_positions: int | None = None):
        super().__init__()
        if not static_capable(cfg):
            raise ValueError(f"MustafarStaticLayer serves per_token_magnitude pruning in mode='compressed' only, got "
                             f"k_strategy={cfg.k_strategy!r}, v_strategy={cfg.v_strategy!r}, mode={cfg.mode!r}")
        self.cfg = cfg
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.max_cache_len = max_cache_len
        self.max_positions = max_positions
        self.rows, self.ring = _layout(cfg, head_dim, max_cache_len)
        self.kk, self.kv = cfg.kept("k", head_dim), cfg.kept("v", head_dim)
        self.note: Note | None = None
        self.lengths: torch.Tensor | None = None
        self.seq: torch.Tensor | None = None

    # -- CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, dev = key_states.shape[0], key_states.device
        if dev.type == "cuda" and self.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"MustafarCache(max_cache_len=...) on CUDA needs a float16 / bfloat16 model (its CUDA "
                             f"decode kernels and append_decode are 16-bit kernels), got {self.dtype}; a float32 model on "
                             f"CUDA can use the growing MustafarCache (no max_cache_len)")
        d, h, w = self.head_dim, self.num_kv_heads, self.head_dim // 64
        self.device, self.batch_size = dev, b
        self.k_bitmap = torch.zeros(b, h, self.rows, w, dtype=torch.int64, device=dev)
        self.v_bitmap = torch.zeros(b, h, self.rows, w, dtype=torch.int64, device=dev)
        scales = {}
        for which, k in (("k", self.kk), ("v", self.kv)):
            vdt = self.cfg.value_dtype(which) or self.dtype
            setattr(self, f"{which}_vals", _with_slack((b, h, self.rows, k), vdt, dev))
            scales[which] = (torch.ones(b, h, self.rows, dtype=torch.float16, device=dev)
                             if self.cfg.value_dtype(which) is not None else None)
        self.k_scale, self.v_scale = scales["k"], scales["v"]
        self.k_win = torch.zeros(b, h, self.ring, d, dtype=self.dtype, device=dev)
        self.v_win = torch.zeros(b, h, self.ring, d, dtype=self.dtype, device=dev)
        self.lengths = torch.zeros(2, dtype=torch.int32, device=dev)
        self.seq = torch.zeros((), dtype=torch.int64, device=dev)
        self.keys, self.values = self.k_win, self.v_win  # what code that peeks at a layer sees
        self._store = dict(k_bitmap=self.k_bitmap, k_values=self.k_vals, v_bitmap=self.v_bitmap,
                           v_values=self.v_vals, k_window=self.k_win, v_window=self.v_win, k_scale=self.k_scale,
                           v_scale=self.v_scale, lengths=self.lengths, head_dim=d,
                           kernel=self.cfg.decode_kernel if dev.type == "cuda" else "auto")
        self.is_initialized = True  # before the marking: tensors() lists nothing until then
        if not _is_compiling():
            for t in self.tensors().values():
                torch._dynamo.mark_static_address(t)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer holds, by role (value buffers with their slack)."""
        if not self.is_initialized:
            return {}
        out = {"k_bitmap": self.k_bitmap, "v_bitmap": self.v_bitmap, "k_values": self.k_vals,
               "v_values": self.v_vals, "k_window": self.k_win, "v_window": self.v_win, "lengths": self.lengths,
               "seq": self.seq}
        if self.k_scale is not None:
            out["k_scales"] = self.k_scale
        if self.v_scale is not None:
            out["v_scales"] = self.v_scale
        return out

    def held_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors().values()) + (2 * SLACK_BYTES if self.is_initialized else 0)

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(f"key/value states must be [B, H_kv, T, D] of equal shape, got {tuple(key_states.shape)} "
                             f"and {tuple(value_states.shape)}")
        b, h, _, d = key_states.shape
        if h != self.num_kv_heads or d != self.head_dim:
            raise ValueError(f"this MustafarCache was built for H_kv={self.num_kv_heads}, head_dim={self.head_dim}; "
                             f"got H_kv={h}, head_dim={d}")
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise ValueError(f"this MustafarCache was built for dtype {self.dtype}; got {key_states.dtype}")
        if self.is_initialized and b != self.batch_size:
            raise ValueError(f"batch size {b} != the cache's batch size {self.batch_size}; call cache.reset()")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """``q_len == 1``: :meth:`decode_step` (compileable); longer: :meth:`prefill` (eager)."""
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[2] == 1:
            return self.decode_step(key_states, value_states)
        return self.prefill(key_states, value_states)

    def decode_step(self, k: torch.Tensor, v: torch.Tensor):
        """One token ``[B, H, 1, D]``: device work only (no host sync, no data-dependent Python)."""
        if not _is_compiling():
            self._check_room(1)
        ops.append_decode(k, v, self.k_win, self.v_win, self.k_bitmap, self.k_vals, self.v_bitmap, self.v_vals,
                          self.k_scale, self.v_scale, self.lengths, self.cfg.local_window, self.cfg.compress_chunk)
        self.seq.add_(1)
        self.note = Note(layer=None, key=self.k_win, store=self._store)
        return self.k_win, self.v_win

    def _host_lengths(self) -> tuple[int, int]:
        n_c, n_w = (int(x) for x in self.lengths.tolist())
        return n_c, n_w

    def _check_room(self, n_new: int) -> None:
        n = int(self.seq)
        if n + n_new > self.max_cache_len:
            raise ValueError(f"MustafarCache(max_cache_len={self.max_cache_len}) is full: {n} tokens held, "
                             f"{n_new} more do not fit")
        if self.max_positions is not None and n + n_new > self.max_positions:
            raise ValueError(f"sequence length {n + n_new} exceeds the model's sliding window {self.max_positions}")

    def _window_order(self, n_c: int, n_w: int) -> torch.Tensor:
        return torch.tensor([(n_c + i) % self.ring for i in range(n_w)], dtype=torch.long, device=self.device)

    def _dense_past(self, which: str, n_c: int) -> torch.Tensor:
        bm = getattr(self, f"{which}_bitmap")[:, :, :n_c]
        vals = getattr(self, f"{which}_vals")[:, :, :n_c]
        sc = getattr(self, f"{which}_scale")
        sp = fmt.SparseKV(bm, vals, self.head_dim, scale=None if sc is None else sc[:, :, :n_c])
        return fmt.decode(sp, dtype=self.dtype)

    def prefill(self, k: torch.Tensor, v: torch.Tensor):
        """A multi-token call (eager): dense K/V of the whole sequence for its attention, then compress all but the
        last ``local_window`` tokens."""
        q = k.shape[2]
        self._check_room(q)
        n_c, n_w = self._host_lengths()
        order = self._window_order(n_c, n_w)
        win_k, win_v = self.k_win[:, :, order], self.v_win[:, :, order]  # [B, H, n_w, D] (copies)
        past_k = torch.cat([self._dense_past("k", n_c), win_k], dim=2) if n_c or n_w else k[:, :, :0]
        past_v = torch.cat([self._dense_past("v", n_c), win_v], dim=2) if n_c or n_w else v[:, :, :0]
        out_k, out_v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        tail_k, tail_v = torch.cat([win_k, k], dim=2), torch.cat([win_v, v], dim=2)  # positions n_c ...
        t = n_c + n_w + q
        n_comp = max(0, (t - self.cfg.local_window) - n_c)  # positions [n_c, n_c + n_comp) leave the window
        if n_comp:
            self._encode_rows("k", tail_k[:, :, :n_comp], n_c)
            self._encode_rows("v", tail_v[:, :, :n_comp], n_c)
        n_c2, n_w2 = n_c + n_comp, t - n_c - n_comp
        slots = self._window_order(n_c2, n_w2)
        self.k_win[:, :, slots] = tail_k[:, :, n_comp:]
        self.v_win[:, :, slots] = tail_v[:, :, n_comp:]
        self.lengths.copy_(torch.tensor([n_c2, n_w2], dtype=torch.int32))
        self.seq.fill_(t)
        self.note = None
        return out_k, out_v

    def _encode_rows(self, which: str, x: torch.Tensor, row0: int) -> None:
        """Prune (per-token magnitude) + encode (+ quantize) ``x [B, H, n, D]`` into store rows ``[row0, row0 + n)``:
        exactly what :func:`mustafar.ops.append_decode` does to one token."""
        sp = fmt.encode_topk(x.contiguous(), getattr(self.cfg, f"{which}_sparsity"),
                             value_dtype=self.cfg.value_dtype(which))
        sl = slice(row0, row0 + x.shape[2])
        getattr(self, f"{which}_bitmap")[:, :, sl] = sp.bitmap
        getattr(self, f"{which}_vals")[:, :, sl] = sp.values
        if sp.scale is not None:
            getattr(self, f"{which}_scale")[:, :, sl] = sp.scale

    # -- Cache API
    @property
    def n_c(self) -> int:
        return self._host_lengths()[0] if self.is_initialized else 0

    @property
    def n_w(self) -> int:
        return self._host_lengths()[1] if self.is_initialized else 0

    def get_seq_length(self, *args):
        return self.seq if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        # decode steps: the capacity, as transformers' StaticLayer (no host read); a multi-token call returns the
        # whole sequence densely, so its mask covers exactly that
        if query_length == 1:
            return self.max_cache_len, 0
        return (int(self.seq) if self.is_initialized else 0) + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            for t in self.tensors().values():
                t.zero_()
            for sc in (self.k_scale, self.v_scale):
                if sc is not None:
                    sc.fill_(1.0)
        self.note = None

