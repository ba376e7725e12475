"""The bitmap sparse format of the KV cache (``SparseKV``) and its byte accounting.

One token vector of head_dim ``D`` (``W = D // 64`` tiles of 64 channels) is stored as::

    dense   x[t] : | c0 c1 c2 ... c63 | c64 ... c127 |           D values
                        tile 0            tile 1
    bitmap[t]    : [ word 0 (int64)  ][ word 1 (int64) ]         W words, bit j of word w <=> channel 64w+j
    values[t]    : [ v v v ... (tile 0's, ascending) | v v ... (tile 1's) | 0 0 ]   exactly k slots

    bitmap : int64 [..., T, W]          values : dense dtype [..., T, k]

``k`` is fixed for a whole ``SparseKV`` (fixed row stride, no per-tile offsets, no padding to a
multiple of 8), so per-token top-k pruning sits exactly on the byte floor
``8*W + k*itemsize`` bytes per token vector. Rows holding fewer than ``k`` values are zero-padded;
the bitmap, not the value, says what is stored (a stored value may be 0, NaN or inf).

FP8 values: ``values`` may be ``torch.float8_e4m3fn`` with a float16 ``scale [..., T]`` per token
vector (:func:`quantize_fp8`, the one rule; stored value = ``q8.float() * scale.float()``):
``8*W + k + 2`` bytes per token vector (D=128, 70%: 16 + 38 + 2 = 56 B = 0.219 of fp16 dense).

The paper's layout (modelled by :func:`paper_format_bytes` for comparison) instead stores per
64-element tile a 64-bit bitmap, an int32 offset and the tile's nonzeros in fp16 padded to a
multiple of 8: 0.648 / 0.455 of dense at 50% / 70% sparsity (D=128), against 0.5625 / 0.359 here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from math import comb

import torch

from mustafar import ops
from mustafar.ops.reference import FP8, check_head_dim, dequantize_fp8, quantize_fp8
from mustafar.pruning._common import kept_count  # the one kept count (pruning needs it below format)

__all__ = [
    "SparseKV",
    "encode",
    "encode_topk",
    "decode",
    "kept_count",
    "quantize_fp8",
    "nbytes_dense",
    "format_bytes",
    "format_bytes_ratio",
    "paper_format_bytes",
    "paper_format_bytes_ratio",
]

_BITS = 64


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class SparseKV:
    """A compressed K or V tensor of logical shape ``[..., T, D]``.

    Attributes
    ----------
    bitmap : int64 ``[..., T, W]`` (``W = D // 64``)
    values : ``[..., T, k]`` (dense dtype or ``torch.float8_e4m3fn``), stored values in ascending
        channel order, 0-padded.
    head_dim : ``D``.
    scale : float16 ``[..., T]``, the per-token-vector scale of FP8 values (:func:`quantize_fp8`);
        required iff ``values`` is float8_e4m3fn.
    """

    bitmap: torch.Tensor
    values: torch.Tensor
    head_dim: int
    scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        w = check_head_dim(self.head_dim)
        if self.bitmap.dtype != torch.int64:
            raise ValueError(f"bitmap.dtype={self.bitmap.dtype}: must be int64")
        if self.bitmap.dim() < 2 or self.bitmap.shape[-1] != w:
            raise ValueError(f"bitmap shape {tuple(self.bitmap.shape)}: expected [..., T, {w}] for D={self.head_dim}")
        if self.values.shape[:-1] != self.bitmap.shape[:-1]:
            raise ValueError(
                f"values shape {tuple(self.values.shape)} and bitmap shape {tuple(self.bitmap.shape)} "
                "differ in the leading dims"
            )
        if self.values.shape[-1] > self.head_dim:
            raise ValueError(f"values hold k={self.values.shape[-1]} > D={self.head_dim} slots per row")
        if self.values.dtype != FP8:
            if self.scale is not None:
                raise ValueError(f"scale given but values.dtype={self.values.dtype}: a scale belongs to "
                                 "float8_e4m3fn values only")
            return
        if self.scale is None:
            raise ValueError("values.dtype=torch.float8_e4m3fn needs scale (float16 [..., T])")
        if not isinstance(self.scale, torch.Tensor) or self.scale.dtype != torch.float16:
            raise ValueError(f"scale.dtype={getattr(self.scale, 'dtype', type(self.scale).__name__)}: "
                             "must be torch.float16")
        if self.scale.shape != self.values.shape[:-1]:
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != values shape without its last dim "
                             f"{tuple(self.values.shape[:-1])}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical dense shape ``[..., T, D]``."""
        return (*self.bitmap.shape[:-1], self.head_dim)

    @property
    def num_tokens(self) -> int:
        return self.bitmap.shape[-2]

    @property
    def kept(self) -> int:
        """``k``: value slots per token vector."""
        return self.values.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Exact bytes of the logical tensors (bitmap + values + FP8 scales), not of any larger backing buffer."""
        scale = 0 if self.scale is None else self.scale.numel() * 2
        return self.bitmap.numel() * 8 + self.values.numel() * self.values.element_size() + scale

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``[..., T, D]`` tensor (unstored channels 0); see :func:`decode`."""
        return decode(self, dtype)

    def __getitem__(self, index: slice) -> "SparseKV":
        """Slice along ``T``: ``sp[t0:t1]`` (views, no copy)."""
        if not isinstance(index, slice):
            raise ValueError(f"SparseKV supports slicing along T only (sp[t0:t1]), got {index!r}")
        scale = None if self.scale is None else self.scale[..., index]
        return SparseKV(self.bitmap[..., index, :], self.values[..., index, :], self.head_dim, scale)

    def __len__(self) -> int:
        return self.num_tokens


def encode(x: torch.Tensor, mask: torch.Tensor | None = None, k: int | None = None) -> SparseKV:
    """Encode ``x [..., T, D]`` exactly: the entries where ``mask`` is True (default ``x != 0``).

    ``k`` defaults to the largest number of stored entries in any row, so every pattern is exact.
    NaN counts as stored under the default mask (``NaN != 0``); a given mask preserves any value.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor [..., T, D], got {getattr(x, 'shape', type(x))}")
    check_head_dim(int(x.shape[-1]))
    if mask is None:
        mask = x != 0
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != x.shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape)}")
    if k is None:
        k = int(mask.sum(-1).max()) if mask.numel() else 0
    bitmap, values = ops.encode_bitmap(x, mask, k)
    return SparseKV(bitmap, values, int(x.shape[-1]))


def _fp8(value_dtype) -> bool:
    """Whether ``value_dtype`` asks for FP8 values: ``None`` (the dense dtype) or ``torch.float8_e4m3fn``."""
    if value_dtype is not None and value_dtype != FP8:
        raise ValueError(f"value_dtype={value_dtype!r}: expected None (the dense dtype) or torch.float8_e4m3fn")
    return value_dtype == FP8


def encode_topk(x: torch.Tensor, sparsity: float, value_dtype: torch.dtype | None = None) -> SparseKV:
    """Per-token magnitude pruning of ``sparsity`` (design.md tie rule) fused with encoding.

    ``value_dtype=torch.float8_e4m3fn`` quantizes the kept values (:func:`quantize_fp8`); the bitmap is
    that of the unquantized encoding.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor [..., T, D], got {getattr(x, 'shape', type(x))}")
    fp8 = _fp8(value_dtype)
    d = int(x.shape[-1])
    k = kept_count(d, sparsity)
    bitmap, values = ops.prune_encode_topk(x, k)
    if fp8:
        q8, scale = quantize_fp8(values)
        return SparseKV(bitmap, q8, d, scale)
    return SparseKV(bitmap, values, d)


def decode(sp: SparseKV, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``[..., T, D]`` from a :class:`SparseKV`: in ``values.dtype`` (or ``dtype`` when given); FP8
    values are dequantized (``q8.float() * scale.float()``) into ``dtype``, default float16."""
    if not isinstance(sp, SparseKV):
        raise ValueError(f"decode expects a SparseKV, got {type(sp).__name__}")
    if sp.values.dtype == FP8:
        return ops.decode_bitmap(sp.bitmap, dequantize_fp8(sp.values, sp.scale, dtype or torch.float16), sp.head_dim)
    out = ops.decode_bitmap(sp.bitmap, sp.values, sp.head_dim)
    return out if dtype is None else out.to(dtype)


# ------------------------------------------------------------------------------ byte accounting
def nbytes_dense(shape, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of a dense tensor of ``shape`` and ``dtype``."""
    return int(math.prod(int(s) for s in shape)) * _itemsize(dtype)


def format_bytes(head_dim: int, sparsity: float, dtype: torch.dtype = torch.float16,
                 value_dtype: torch.dtype | None = None) -> int:
    """Bytes per token vector in our layout: ``8*W + k*itemsize`` (values in ``dtype``), or with
    ``value_dtype=torch.float8_e4m3fn`` ``8*W + k + 2`` (FP8 values and a float16 scale)."""
    w = check_head_dim(head_dim)
    k = kept_count(head_dim, sparsity)
    return 8 * w + (k + 2 if _fp8(value_dtype) else k * _itemsize(dtype))


def format_bytes_ratio(head_dim: int, sparsity: float, dtype: torch.dtype = torch.float16,
                       value_dtype: torch.dtype | None = None) -> float:
    """Our bytes / dense bytes (in ``dtype``) per token vector, e.g. ``D=128, fp16, 0.7 -> 92/256 = 0.359``;
    with FP8 values ``56/256 = 0.219``."""
    return format_bytes(head_dim, sparsity, dtype, value_dtype) / (head_dim * _itemsize(dtype))


def _ceil8(n: int) -> int:
    return -(-n // 8) * 8


def paper_format_bytes(head_dim: int, sparsity: float | None = None, bitmap: torch.Tensor | None = None) -> float:
    """Bytes per token vector in the paper's layout (fp16 values).

    Per 64-element tile: a 64-bit bitmap (8 B), an int32 offset (4 B) and the tile's nonzeros in
    fp16 padded to a multiple of 8. Given ``bitmap [..., T, W]`` it is exact for that pattern
    (mean over token vectors); given ``sparsity`` it is the expectation for per-token top-k with
    the kept channels spread at random (hypergeometric count per tile): 0.647 / 0.450 of dense at
    50% / 70% for D=128 (the paper measured 0.648 / 0.455 on real caches).
    """
    w = check_head_dim(head_dim)
    if (sparsity is None) == (bitmap is None):
        raise ValueError("give exactly one of sparsity or bitmap")
    if bitmap is not None:
        if bitmap.dtype != torch.int64 or bitmap.shape[-1] != w:
            raise ValueError(f"bitmap must be int64 [..., T, {w}], got {bitmap.dtype} {tuple(bitmap.shape)}")
        shifts = torch.arange(_BITS, device=bitmap.device)
        cnt = ((bitmap.unsqueeze(-1) >> shifts) & 1).sum(-1)  # [..., T, W] nonzeros per tile
        padded = (cnt + 7) // 8 * 8
        per_vec = (12 * w + 2 * padded.sum(-1)).double()  # [..., T]
        return float(per_vec.mean()) if per_vec.numel() else 0.0
    k = kept_count(head_dim, sparsity)
    if w == 1:
        return 12.0 + 2.0 * _ceil8(k)
    total = comb(head_dim, _BITS)
    e_pad = sum(comb(k, x) * comb(head_dim - k, _BITS - x) * _ceil8(x) for x in range(0, _BITS + 1)) / total
    return w * (12.0 + 2.0 * e_pad)


def paper_format_bytes_ratio(head_dim: int, sparsity: float) -> float:
    """:func:`paper_format_bytes` over dense fp16 bytes (``2*D``)."""
    return paper_format_bytes(head_dim, sparsity) / (2.0 * head_dim)
