"""Plain-torch twins of every compiled ``mustafar`` op: the ground truth in tests.

Everything here is written for readability, not speed. The layout and the tie rule are the
contract in ``docs/design.md``:

* ``bitmap`` int64 ``[..., T, W]`` (``W = D // 64``): bit ``j`` (LSB = bit 0) of word ``w`` is set
  iff channel ``64*w + j`` is stored.
* ``values`` ``[..., T, k]`` in the dense dtype: the stored values of each token vector in ascending
  channel order; slots past ``popcount(row)`` are 0.
* Per-token top-k keeps the ``k`` largest ``|x|``; of equal magnitudes the lower channel index is
  pruned first; NaN counts as the largest magnitude.
* FP8 stored values (:func:`quantize_fp8`): ``values`` float8_e4m3fn with a float16 scale per token
  vector ``[..., T]``; the stored value is ``q8.float() * scale.float()``.
* ``sparse_decode(..., lengths=(n_c, n_w))``: compressed rows ``[0, n_c)`` and a ring window of
  ``R = k_window.shape[2]`` slots whose row ``i`` is slot ``(n_c + i) % R``; :func:`append_decode` is
  the one decode step that fills that layout.
"""

from __future__ import annotations

import math

import torch

from mustafar.pruning import topk_mask as _pruning_topk_mask

__all__ = [
    "topk_mask",
    "encode_bitmap",
    "decode_bitmap",
    "prune_encode_topk",
    "sparse_decode",
    "append_decode",
    "quantize_fp8",
    "dequantize_fp8",
    "popcount",
]

_BITS = 64
FP8 = torch.float8_e4m3fn
#: largest finite float8_e4m3fn magnitude
FP8_MAX = 448.0


def check_head_dim(d: int) -> int:
    """``W = D // 64`` bitmap words per token vector; ``ValueError`` unless ``D`` is a positive multiple of 64.

    The one head-dim check of the project (ops, reference and :mod:`mustafar.format` use it).
    """
    if isinstance(d, bool) or not isinstance(d, (int, torch.SymInt)) or d <= 0 or d % _BITS != 0:
        raise ValueError(f"head_dim D={d!r} must be a positive multiple of 64 (64, 128, 256)")
    return d // _BITS


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest-magnitude entries of every row along the last dim.

    The package's one implementation of the tie rule, :func:`mustafar.pruning.topk_mask`: ties prune
    the lower channel index first; NaN is the largest magnitude.
    """
    return _pruning_topk_mask(x, int(k))


def quantize_fp8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one FP8 (e4m3) quantization rule of the project, per token vector (row of ``values [..., T, k]``).

    ``amax = max|v|`` in float32; ``s = (amax / 448).to(float16)`` (round to nearest), ``s = 1`` where it
    is 0; ``q8 = clamp(v.float() / s.float(), -448, 448).to(float8_e4m3fn)`` (round to nearest even).
    Zero padding slots stay 0. The C++ and CUDA kernels implement the identical rule.

    Returns
    -------
    q8 : float8_e4m3fn ``[..., T, k]``; scale : float16 ``[..., T]``.
    """
    v = values.float()
    amax = v.abs().amax(dim=-1) if v.shape[-1] else v.new_zeros(v.shape[:-1])  # NaN propagates
    scale = (amax / FP8_MAX).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q8 = (v / scale.float().unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q8, scale


def dequantize_fp8(q8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q8.float() * scale.float()`` (``[..., T, k]`` with ``scale [..., T]``) in ``dtype``."""
    return (q8.float() * scale.float().unsqueeze(-1)).to(dtype)


def _values_as(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Stored values in ``dtype``: dequantized where they are FP8."""
    return dequantize_fp8(values, scale, dtype) if values.dtype == FP8 else values.to(dtype)


def _check_range(name: str, x: int, hi: int, what: str) -> None:
    if not 0 <= x <= hi:
        raise ValueError(f"lengths {name}={x} out of range [0, {hi}] ({what})")


def popcount(bitmap: torch.Tensor) -> torch.Tensor:
    """Number of set bits per token vector: ``[..., T, W]`` int64 -> ``[..., T]`` int64."""
    shifts = torch.arange(_BITS, device=bitmap.device, dtype=torch.int64)
    bits = (bitmap.unsqueeze(-1) >> shifts) & 1  # [..., T, W, 64]
    return bits.sum(dim=(-1, -2))


def _mask_to_bitmap(mask: torch.Tensor) -> torch.Tensor:
    d = mask.shape[-1]
    w = d // _BITS
    tiles = mask.reshape(*mask.shape[:-1], w, _BITS).to(torch.int64)  # [..., T, W, 64]
    weights = torch.ones(_BITS, dtype=torch.int64, device=mask.device) << torch.arange(
        _BITS, dtype=torch.int64, device=mask.device
    )  # bit 63 is -2**63: distinct powers of two never carry, so the sum is the bitwise OR
    return (tiles * weights).sum(dim=-1)  # [..., T, W]


def _bitmap_to_mask(bitmap: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(_BITS, device=bitmap.device, dtype=torch.int64)
    bits = ((bitmap.unsqueeze(-1) >> shifts) & 1).bool()  # [..., T, W, 64]
    return bits.reshape(*bitmap.shape[:-1], bitmap.shape[-1] * _BITS)  # [..., T, D]


def encode_bitmap(x: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the entries of ``x`` selected by ``mask`` into the bitmap format.

    Parameters
    ----------
    x : Tensor ``[..., T, D]`` float
    mask : Tensor bool ``[..., T, D]``, at most ``k`` True per row.
    k : int, values slots per row.

    Returns
    -------
    bitmap : Tensor int64 ``[..., T, W]``
    values : Tensor ``[..., T, k]`` in ``x.dtype``; padding slots are 0.
    """
    d = x.shape[-1]
    check_head_dim(d)
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != x shape {tuple(x.shape)}")
    mask = mask.to(torch.bool)
    k = int(k)
    if not 0 <= k <= d:
        raise ValueError(f"k={k} out of range [0, {d}]")
    counts = mask.sum(-1)
    if counts.numel() and int(counts.max()) > k:
        raise ValueError(f"mask keeps up to {int(counts.max())} entries in a row but k={k}")
    pos = torch.cumsum(mask.to(torch.int64), dim=-1) - 1  # [..., T, D] slot of each stored entry
    slot = torch.where(mask, pos, torch.full_like(pos, k))  # unstored -> dump slot k
    values = torch.zeros(*x.shape[:-1], k + 1, dtype=x.dtype, device=x.device)
    values.scatter_(-1, slot, torch.where(mask, x, torch.zeros_like(x)))
    values = values[..., :k].contiguous()  # [..., T, k]
    return _mask_to_bitmap(mask), values


def decode_bitmap(bitmap: torch.Tensor, values: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`encode_bitmap`: ``[..., T, W]`` + ``[..., T, k]`` -> dense ``[..., T, D]``.

    Unstored channels are 0.
    """
    w = check_head_dim(int(head_dim))
    if bitmap.shape[-1] != w:
        raise ValueError(f"bitmap last dim {bitmap.shape[-1]} != head_dim/64 = {w}")
    mask = _bitmap_to_mask(bitmap)  # [..., T, D]
    k = values.shape[-1]
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    if k == 0:
        return out
    pos = (torch.cumsum(mask.to(torch.int64), dim=-1) - 1).clamp(0, k - 1)  # [..., T, D]
    gathered = torch.gather(values, -1, pos)
    return torch.where(mask, gathered, out)


def prune_encode_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token top-k magnitude pruning + encoding: ``encode_bitmap(x, topk_mask(x, k), k)``."""
    check_head_dim(x.shape[-1])
    return encode_bitmap(x, topk_mask(x, k), k)


def sparse_decode(
    q: torch.Tensor,
    k_bitmap: torch.Tensor,
    k_values: torch.Tensor,
    v_bitmap: torch.Tensor,
    v_values: torch.Tensor,
    k_window: torch.Tensor,
    v_window: torch.Tensor,
    kv_start: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    kernel: str = "auto",
    pdl: bool = True,
) -> torch.Tensor:
    """One-query-token attention over ``[compressed (T_c) ; dense window (T_w)]``.

    Parameters
    ----------
    q : ``[B, H_q, D]``
    k_bitmap, v_bitmap : int64 ``[B, H_kv, T_c, W]``
    k_values : ``[B, H_kv, T_c, k_k]``; v_values : ``[B, H_kv, T_c, k_v]``; q's dtype or float8_e4m3fn
    k_window, v_window : ``[B, H_kv, T_w, D]`` (``T_w`` may be 0)
    kv_start : optional int ``[B]``; positions ``< kv_start[b]`` are masked (left padding).
    scale : softmax scale, default ``1/sqrt(D)``.
    k_scale, v_scale : float16 ``[B, H_kv, T_c]``, the FP8 scales of that side (None unless it is FP8).
    lengths : optional int32 ``[2] = (n_c, n_w)``: attend compressed rows ``[0, n_c)`` and ``n_w`` window
        rows, row ``i`` in ring slot ``(n_c + i) % T_w``. None: ``n_c = T_c``, ``n_w = T_w``, row ``i`` in
        slot ``i``. Positions: compressed row ``r`` is ``r``, window row ``i`` is ``n_c + i``.
    kernel, pdl : accepted for signature parity with :func:`mustafar.ops.dispatch.sparse_decode` and
        ignored (they pick and launch CUDA kernels; the reference has one computation).

    Returns
    -------
    ``[B, H_q, D]`` in ``q.dtype``. Computed in float32 (float64 if ``q`` is float64).
    A sequence with every position masked returns zeros.
    """
    b, h_q, d = q.shape
    h_kv = k_bitmap.shape[1]
    g = h_q // h_kv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if lengths is not None:  # visible rows: the first n_c of the store, n_w ring slots from n_c % R
        n_c, n_w = (int(x) for x in lengths.tolist())
        r = k_window.shape[2]
        _check_range("n_c", n_c, k_bitmap.shape[2], "T_c, the store's rows")
        _check_range("n_w", n_w, r, "R, the window's slots")
        slots = (n_c + torch.arange(n_w, device=k_window.device)) % max(r, 1)
        k_window, v_window = k_window[:, :, slots], v_window[:, :, slots]
        k_bitmap, k_values, v_bitmap, v_values = (x[:, :, :n_c] for x in (k_bitmap, k_values, v_bitmap, v_values))
        k_scale = None if k_scale is None else k_scale[:, :, :n_c]
        v_scale = None if v_scale is None else v_scale[:, :, :n_c]
    keys = torch.cat([decode_bitmap(k_bitmap, _values_as(k_values, k_scale, cdt), d), k_window.to(cdt)], dim=2)
    vals = torch.cat([decode_bitmap(v_bitmap, _values_as(v_values, v_scale, cdt), d), v_window.to(cdt)], dim=2)
    # keys / vals: [B, H_kv, T, D]
    t = keys.shape[2]
    qg = q.to(cdt).reshape(b, h_kv, g, d)  # [B, H_kv, G, D]
    scores = torch.einsum("bhgd,bhtd->bhgt", qg, keys) * scale  # [B, H_kv, G, T]
    valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    if kv_start is not None:
        valid = torch.arange(t, device=q.device)[None, :] >= kv_start.to(q.device).long()[:, None]
    valid = valid[:, None, None, :]  # [B, 1, 1, T]
    scores = scores.masked_fill(~valid, -math.inf)
    m = scores.amax(dim=-1, keepdim=True) if t else scores.new_zeros(b, h_kv, g, 1)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)  # all-masked rows: avoid inf - inf
    p = torch.exp(scores - m).masked_fill(~valid, 0.0)  # [B, H_kv, G, T]
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhgt,bhtd->bhgd", p, vals)
    out = torch.where(denom > 0, out / denom.clamp_min(torch.finfo(cdt).tiny), torch.zeros_like(out))
    return out.reshape(b, h_q, d).to(q.dtype)


def append_decode(k, v, k_window, v_window, k_bitmap, k_values, v_bitmap, v_values, k_scale, v_scale, lengths,
                  local_window: int, chunk: int) -> None:
    """One decode step of a preallocated cache layer (in place; the layout :func:`sparse_decode` reads).

    Tensors as in :func:`mustafar.ops.dispatch.append_decode`: ``k, v [B, H, 1, D]``; rings
    ``k_window, v_window [B, H, R, D]``; store ``*_bitmap [B, H, C, W]``, ``k_values [B, H, C, k_k]``,
    ``v_values [B, H, C, k_v]`` (dense dtype or FP8 with ``*_scale`` float16 ``[B, H, C]``, else None);
    ``lengths`` int32 ``[2] = (n_c, n_w)``.

    With ``(n_c, n_w) = lengths``, ``n = n_c + n_w``, ``R = k_window.shape[2]``, ``L = local_window``:

    1. the new token ``k[:, :, 0]`` / ``v[:, :, 0]`` goes to ring slot ``n % R``;
    2. ``e = n - L`` (the token that leaves the ``L`` most recent): if ``e >= max(0, n_c)`` it is pruned
       to ``k_values.shape[-1]`` (K) / ``v_values.shape[-1]`` (V) values (:func:`prune_encode_topk`),
       quantized where that side is FP8 (:func:`quantize_fp8`), and written to store row ``e``;
    3. ``n_w += 1``; if ``n_w > L + chunk``: ``n_c += chunk``, ``n_w -= chunk``; written to ``lengths``.
    """
    n_c, n_w = (int(x) for x in lengths.tolist())
    r, cap = k_window.shape[2], k_bitmap.shape[2]
    _check_range("n_c", n_c, cap, "C, the store's rows")
    _check_range("n_w", n_w, local_window + chunk, "local_window + chunk")
    n = n_c + n_w
    k_window[:, :, n % r] = k[:, :, 0]
    v_window[:, :, n % r] = v[:, :, 0]
    e = n - local_window
    if e >= 0 and e >= n_c:
        if e >= cap:
            raise ValueError(f"append_decode: store row {e} is past the store capacity C={cap}")
        for window, bitmap, values, vscale in ((k_window, k_bitmap, k_values, k_scale),
                                               (v_window, v_bitmap, v_values, v_scale)):
            rb, rv = prune_encode_topk(window[:, :, e % r], values.shape[-1])  # [B, H, W], [B, H, k]
            if vscale is not None:
                rv, vscale[:, :, e] = quantize_fp8(rv)
            bitmap[:, :, e] = rb
            values[:, :, e] = rv
    n_w += 1
    if n_w > local_window + chunk:
        n_c, n_w = n_c + chunk, n_w - chunk
    lengths.copy_(torch.tensor([n_c, n_w], dtype=lengths.dtype))
