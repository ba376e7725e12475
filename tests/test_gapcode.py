"""CPU tests of ``mustafar.gapcode`` (the gap-code layout's reference encoder / decoder): exact round trips
against top-k pruning on fresh random rows and on rows built to need every filler, the packing, the bytes."""

from __future__ import annotations

import pytest
import torch

from mustafar import gapcode
from mustafar.format import decode as bitmap_decode
from mustafar.format import encode_topk, kept_count


def _topk_dense(x, k):
    idx = x.abs().float().topk(k, dim=-1).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_equals_top_k_pruning(d, sparsity, dtype):
    x = torch.randn(2, 3, 37, d).to(dtype)
    k = kept_count(d, sparsity)
    g = gapcode.encode(x, k)
    s = gapcode.slots(d, k)
    assert g.values.shape == (2, 3, 37, s) and g.codes.shape == (2, 3, 37, 4 * ((s + 7) // 8))
    out = gapcode.decode(g)
    assert out.dtype == dtype and torch.equal(out, _topk_dense(x, k))
    # the same rows the bitmap format keeps at that sparsity (float32: no ties in magnitude to break differently)
    if 0 < sparsity and dtype == torch.float32:
        assert torch.equal(out, bitmap_decode(encode_topk(x, sparsity)))


def test_rows_that_need_every_filler_and_rows_ending_at_the_last_channel():
    d = 128
    k = 8
    x = torch.full((4, d), 1e-3)
    x[0, d - k:] = 5.0            # one gap of 120 before the kept block: 7 bridging fillers = E
    x[1, :k] = 5.0                # kept block first: all fillers spare
    x[2, ::16] = 5.0              # gaps of exactly 15: no filler needed
    x[3, torch.tensor([0, 17, 34, 51, 68, 85, 102, 127])] = 5.0  # gaps of 16 (and 24): one filler each
    g = gapcode.encode(x, k)
    assert gapcode.slots(d, k) == k + 7 and g.values.shape == (4, 15)
    assert torch.equal(gapcode.decode(g), torch.where(x == 5.0, x, torch.zeros(())))
    assert int((g.values != 0).sum(1).min()) == k  # exactly the k kept values are non-zero; fillers are 0


def test_packing_low_nibbles_first():
    # D = 64, k = 8 -> S = 11 slots, 2 code words. Kept channels 3, 5, ..., 17; the 3 spare fillers take the first
    # free pruned channels 0, 1, 2: slots at 0 1 2 3 5 7 9 11 13 15 17, codes 0 0 0 0 1 1 1 1 1 1 1
    x = torch.zeros(1, 64)
    x[0, 3:18:2] = torch.arange(1, 9).float()
    g = gapcode.encode(x, 8)
    # byte b of word i: slot 8i + b in the low nibble, slot 8i + 4 + b in the high nibble; padding slots 0
    assert g.codes[0].tolist() == [16, 16, 16, 16, 1, 1, 1, 0]
    assert g.values[0].tolist() == [0.0, 0.0, 0.0] + [float(i) for i in range(1, 9)]


def test_bytes_and_bad_input():
    assert gapcode.format_bytes(128, 0.7) == 24 + 86  # S = 38 + 90 // 16 = 43
    assert gapcode.format_bytes(128, 0.7, torch.float8_e4m3fn) == 24 + 43
    for d in (64, 128, 256):
        for s in (0.5, 0.6, 0.7, 0.8, 0.9):
            assert gapcode.format_bytes(d, s) < 2 * d  # never more than the dense row it replaces
    x = torch.randn(3, 5, 128, dtype=torch.float16)
    g = gapcode.encode(x, 38)
    assert g.nbytes() == 15 * gapcode.format_bytes(128, 0.7)
    with pytest.raises(ValueError, match="k must be"):
        gapcode.encode(x, 0)
    with pytest.raises(ValueError, match="head_dim must be"):
        gapcode.slots(100, 3)
    with pytest.raises(ValueError, match="floating"):
        gapcode.encode(torch.ones(2, 64, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="slots"):
        gapcode.decode(gapcode.GapKV(g.codes, g.values[..., :-1], 128, 38))
    bad = g.codes.clone()
    bad[..., :] = 0xFF  # every code 15: channels past D
    with pytest.raises(ValueError, match="reach channel"):
        gapcode.decode(gapcode.GapKV(bad, g.values, 128, 38))


@pytest.mark.parametrize("d, sparsity", [(64, 0.7), (64, 0.8), (128, 0.5), (128, 0.7), (256, 0.7)])
def test_aligned_slots_round_trip(d, sparsity):
    k = kept_count(d, sparsity)
    s1 = gapcode.slots(d, k)
    for align in (2, 4, 8):
        s = gapcode.slots(d, k, align)
        assert s % align == 0 and s1 <= s < s1 + align and s <= d
        x = torch.randn(3, 29, d, dtype=torch.float16)
        g = gapcode.encode(x, k, align=align)
        assert g.values.shape == (3, 29, s)
        assert torch.equal(gapcode.decode(g), _topk_dense(x, k))
    with pytest.raises(ValueError, match="align"):
        gapcode.slots(d, k, 3)


@pytest.mark.parametrize("t", [1, 31, 32, 77])
def test_tile_major_layout(t):
    d, k = 128, 38
    x = torch.randn(2, 3, t, d, dtype=torch.float16)
    g = gapcode.encode(x, k, align=4)
    s = g.values.shape[-1]
    codes, vals = gapcode.tile_major(g)
    nt, nc = -(-t // 32), (s + 7) // 8
    assert codes.shape == (2, 3, nt, nc, 32) and codes.dtype == torch.int32
    assert vals.shape == (2, 3, nt, s // 4, 32, 4)
    # token 32 i + r: code word w at codes[..., i, w, r], slots 4 j .. 4 j + 3 at vals[..., i, j, r, :]
    i, r = (t - 1) // 32, (t - 1) % 32
    assert torch.equal(codes[1, 2, i, :, r].contiguous().view(torch.uint8), g.codes[1, 2, t - 1])
    assert torch.equal(vals[1, 2, i, :, r, :].reshape(s), g.values[1, 2, t - 1])
    # the padding rows of the last tile: code 0, value 0 (slots at channels 0 .. S - 1, all zero)
    if t % 32:
        assert int(codes[:, :, -1, :, t % 32:].abs().sum()) == 0 and int(vals[:, :, -1, :, t % 32:].abs().sum()) == 0
    back = gapcode.from_tile_major(codes, vals, t, d, k)
    assert torch.equal(back.codes, g.codes) and torch.equal(back.values, g.values)
    with pytest.raises(ValueError, match="multiple of 4"):
        gapcode.tile_major(gapcode.encode(x, k, align=1) if gapcode.slots(d, k) % 4 else gapcode.encode(x, 39))
    with pytest.raises(ValueError, match="outside"):
        gapcode.from_tile_major(codes, vals, nt * 32 + 1, d, k)
