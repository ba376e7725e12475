"""The gap-code layout: the candidate fast-path layout of issue #15, as a plain-torch reference.

Not used by the cache or the extension's kernels (``docs/kernel_design.md``, sections "Session 14" and "Session 15",
say why it is a candidate and what it measured); the prototype decode kernel ``csrc/proto/gap_decode.cuh`` reads
its :func:`tile_major` layout and is checked against attention over :func:`decode`'s rows. The paper's bitmap
format (:mod:`mustafar.format`) stays the format of record.

One token vector of ``D`` channels with its ``k`` kept values (per-token top-k by magnitude) is stored as
``S = k + E`` slots, ``E = (D - k) // 16``::

    codes[t]  : 4-bit code per slot = pruned channels skipped before the slot's channel (0-15)
    values[t] : one value per slot (the kept value, or 0 for a filler slot)

A gap of more than 15 pruned channels before a kept one is bridged by *filler slots* (value 0 at the pruned
channels 16, 32, ... after the previous slot); the fillers a row does not need for that sit in its first other
pruned channels, so every row has exactly ``S`` slots and slot ``j``'s channel is ``sum(code[0..j]) + j``. ``E``
is the most fillers any row can need (``D - k`` pruned channels, bridged 16 at a time), so every row fits.
Codes are packed 8 per 32-bit word, slots ``8i .. 8i+3`` in the low nibbles of word ``i``'s bytes 0-3 and slots
``8i+4 .. 8i+7`` in their high nibbles (one multiply by ``0x01010101`` gives four prefix sums:
``csrc/proto/position_walk.cu``); the padding slots past ``S`` hold code 0 and are never read.

Bytes per token vector: ``4 * ceil(S / 8)`` of codes + ``S * itemsize`` of values (D = 128, 70 %: 24 + 86 =
110 B = 0.430 of fp16 dense, against the bitmap format's 92 B = 0.359).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mustafar.pruning._common import kept_count

__all__ = ["GapKV", "SPAN", "TILE", "slots", "code_bytes", "encode", "decode", "format_bytes", "tile_major",
           "from_tile_major"]

SPAN = 16  # channels one slot can advance (a code of 0-15 pruned channels, plus its own)
TILE = 32  # tokens per tile of the kernel layout (:func:`tile_major`): one per lane of a warp


def slots(d: int, k: int, align: int = 1) -> int:
    """Slots per token vector: ``k + (d - k) // 16`` (``1 <= k <= d``, ``d`` a multiple of 8), rounded up to a
    multiple of ``align`` (1, 2, 4 or 8) with more filler slots; the prototype kernel reads slots four at a time
    (``align=4``). Never more than ``d``."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 8 or d % 8:
        raise ValueError(f"head_dim must be a positive multiple of 8, got {d!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"k must be an int in [1, {d}] (head_dim={d}), got {k!r}")
    if align not in (1, 2, 4, 8):
        raise ValueError(f"align must be 1, 2, 4 or 8, got {align!r}")
    s = k + (d - k) // SPAN
    return -(-s // align) * align


def code_bytes(s: int) -> int:
    """Bytes of the codes of ``s`` slots: 8 per 32-bit word, whole words."""
    return 4 * ((s + 7) // 8)


@dataclass(frozen=True)
class GapKV:
    """A gap-coded tensor: ``codes`` uint8 ``[..., T, 4 * ceil(S / 8)]`` (packed as the module doc says),
    ``values`` ``[..., T, S]`` (the dense dtype), ``head_dim`` ``D`` and ``k`` (kept values per row)."""

    codes: torch.Tensor
    values: torch.Tensor
    head_dim: int
    k: int

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.values.numel() * self.values.element_size()


def encode(x: torch.Tensor, k: int, align: int = 1) -> GapKV:
    """Keep the ``k`` largest-magnitude channels of every token vector of ``x`` ``[..., D]`` and gap-code them in
    ``slots(D, k, align)`` slots.

    Ties in magnitude are broken as :func:`torch.topk` breaks them; the decoded tensor keeps exactly those
    ``k`` values per row and zeros elsewhere.
    """
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    d = x.shape[-1]
    s = slots(d, k, align)
    rows = x.reshape(-1, d)
    n = rows.shape[0]
    kept = torch.zeros(n, d, dtype=torch.bool, device=x.device)
    kept.scatter_(1, rows.abs().float().topk(k, dim=-1).indices, True)
    ch = torch.arange(d, device=x.device).expand(n, d)
    # previous kept channel (-1 before the first) and whether a kept channel follows, per channel
    prev = torch.where(kept, ch, torch.full_like(ch, -1)).cummax(dim=1).values
    prev = torch.cat([prev.new_full((n, 1), -1), prev[:, :-1]], dim=1)
    last = torch.where(kept, ch, torch.full_like(ch, -1)).max(dim=1, keepdim=True).values
    # bridging fillers: pruned channels 16, 32, ... after the previous kept one, inside a gap a kept channel ends
    bridge = ~kept & (ch < last) & ((ch - prev) % SPAN == 0)
    spare = s - k - bridge.sum(dim=1, keepdim=True)  # >= 0: E is the most any row needs
    free = ~kept & ~bridge
    extra = free & (free.cumsum(dim=1) <= spare)
    slot = kept | bridge | extra
    pos = slot.nonzero()[:, 1].view(n, s)  # ascending per row: exactly S slots each
    codes = torch.diff(pos, dim=1, prepend=pos.new_full((n, 1), -1)) - 1
    assert int(codes.min()) >= 0 and int(codes.max()) < SPAN, "gap codes out of 0-15"
    vals = torch.where(kept.gather(1, pos), rows.gather(1, pos), torch.zeros((), dtype=x.dtype, device=x.device))
    nw = (s + 7) // 8
    c = torch.zeros(n, nw * 8, dtype=torch.uint8, device=x.device)
    c[:, :s] = codes.to(torch.uint8)
    c = c.view(n, nw, 2, 4)  # [word, low / high nibble half, byte]
    packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, nw * 4)
    lead = x.shape[:-1]
    return GapKV(packed.reshape(*lead, nw * 4), vals.reshape(*lead, s), d, k)


def decode(g: GapKV, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense ``[..., T, D]`` tensor of ``g`` (zeros at the pruned channels), in ``dtype`` (default the values')."""
    s = g.values.shape[-1]
    if not slots(g.head_dim, g.k) <= s <= g.head_dim:
        raise ValueError(f"values hold {s} slots, expected {slots(g.head_dim, g.k)} to {g.head_dim} for "
                         f"head_dim={g.head_dim}, k={g.k}")
    nw = (s + 7) // 8
    if g.codes.dtype != torch.uint8 or g.codes.shape[-1] != 4 * nw or g.codes.shape[:-1] != g.values.shape[:-1]:
        raise ValueError(f"codes must be uint8 [..., {4 * nw}] beside values {tuple(g.values.shape)}, got "
                         f"{g.codes.dtype} {tuple(g.codes.shape)}")
    b = g.codes.reshape(-1, nw, 4)
    codes = torch.stack([b & 15, b >> 4], dim=2).reshape(b.shape[0], nw * 8)[:, :s].long()
    pos = (codes + 1).cumsum(dim=1) - 1
    if int(pos.max()) >= g.head_dim:
        raise ValueError(f"gap codes reach channel {int(pos.max())} >= head_dim={g.head_dim}")
    out = torch.zeros(b.shape[0], g.head_dim, dtype=dtype or g.values.dtype, device=g.values.device)
    out.scatter_(1, pos, g.values.reshape(-1, s).to(out.dtype))
    return out.reshape(*g.values.shape[:-1], g.head_dim)


def format_bytes(head_dim: int, sparsity: float, dtype: torch.dtype = torch.float16) -> int:
    """Bytes per token vector at ``sparsity`` with values in ``dtype``: ``4 * ceil(S / 8) + S * itemsize``."""
    s = slots(head_dim, kept_count(head_dim, sparsity))
    return code_bytes(s) + s * torch.empty((), dtype=dtype).element_size()


def tile_major(g: GapKV) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout the prototype decode kernel reads (``csrc/proto/gap_decode.cuh``), from ``g`` ``[..., T, *]``
    with ``S % 4 == 0`` slots: the ``T`` tokens in tiles of 32 (one per lane; the last tile padded with rows of
    code 0 and value 0, i.e. slots at channels ``0 .. S - 1`` holding zeros), and within a tile

    * ``codes`` int32 ``[..., ntile, NC, 32]``: code word ``i`` (slots ``8i .. 8i+7``) of the 32 tokens side by side
      (a warp reads a word of every row with one coalesced load);
    * ``values`` ``[..., ntile, S / 4, 32, 4]``: slots ``4j .. 4j+3`` of the 32 tokens side by side (one 8-byte
      load per four slots; a tile is one contiguous block of ``32 * S`` values).
    """
    s = g.values.shape[-1]
    if s % 4:
        raise ValueError(f"tile_major needs a multiple of 4 slots (encode with align=4), got {s}")
    lead, t = g.values.shape[:-2], g.values.shape[-2]
    nt = -(-t // TILE)
    pad = nt * TILE - t
    nc = g.codes.shape[-1] // 4
    codes = g.codes.contiguous().view(torch.int32)  # [..., T, NC]: byte b of word i = the file's byte 4i + b
    vals = g.values
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*lead, pad, nc)], dim=-2)
        vals = torch.cat([vals, vals.new_zeros(*lead, pad, s)], dim=-2)
    codes = codes.reshape(*lead, nt, TILE, nc).transpose(-1, -2).contiguous()
    vals = vals.reshape(*lead, nt, TILE, s // 4, 4).transpose(-3, -2).contiguous()
    return codes, vals


def from_tile_major(codes: torch.Tensor, values: torch.Tensor, t: int, head_dim: int, k: int) -> GapKV:
    """The inverse of :func:`tile_major`: the first ``t`` tokens as a :class:`GapKV`."""
    lead, nt, nc = codes.shape[:-3], codes.shape[-3], codes.shape[-2]
    if codes.shape[-1] != TILE or values.shape[:-3] != (*lead, nt) or values.shape[-2:] != (TILE, 4):
        raise ValueError(f"codes {tuple(codes.shape)} / values {tuple(values.shape)} are not a tile-major pair")
    if not 0 <= t <= nt * TILE:
        raise ValueError(f"t={t} outside the {nt * TILE} tokens of {nt} tiles")
    c = codes.transpose(-1, -2).reshape(*lead, nt * TILE, nc)[..., :t, :].contiguous().view(torch.uint8)
    v = values.transpose(-3, -2).reshape(*lead, nt * TILE, values.shape[-3] * 4)[..., :t, :]
    return GapKV(c, v.contiguous(), head_dim, k)
