"""Plain-torch twins of every compiled ``mustafar`` op: the ground truth in tests.

Everything here is written for readability, not speed. The layout and the tie rule are the
contract in ``docs/design.md``:

* ``bitmap`` int64 ``[..., T, W]`` (``W = D // 64``): bit ``j`` (LSB = bit 0) of word ``w`` is set
  iff channel ``64*w + j`` is stored.
* ``values`` ``[..., T, k]`` in the dense dtype: the stored values of each token vector in ascending
  channel order; slots past ``popcount(row)`` are 0.
* Per-token top-k keeps the ``k`` largest ``|x|``; of equal magnitudes the lower channel index is
  pruned first; NaN counts as the largest magnitude.
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
    "popcount",
]

_BITS = 64


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
    kernel: str = "auto",
    pdl: bool = True,
) -> torch.Tensor:
    """One-query-token attention over ``[compressed (T_c) ; dense window (T_w)]``.

    Parameters
    ----------
    q : ``[B, H_q, D]``
    k_bitmap, v_bitmap : int64 ``[B, H_kv, T_c, W]``
    k_values : ``[B, H_kv, T_c, k_k]``; v_values : ``[B, H_kv, T_c, k_v]``
    k_window, v_window : ``[B, H_kv, T_w, D]`` (``T_w`` may be 0)
    kv_start : optional int ``[B]``; positions ``< kv_start[b]`` are masked (left padding).
    scale : softmax scale, default ``1/sqrt(D)``.
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
    keys = torch.cat([decode_bitmap(k_bitmap, k_values, d).to(cdt), k_window.to(cdt)], dim=2)
    vals = torch.cat([decode_bitmap(v_bitmap, v_values, d).to(cdt), v_window.to(cdt)], dim=2)
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
