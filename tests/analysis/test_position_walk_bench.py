"""CPU tests of the input builder of ``scripts/position_walk_bench.py`` (the GPU timing of the position-walk
prototypes): the three codes hold the same rows, as the CUDA walks read them, and the expected outputs."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from mustafar import gapcode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("position_walk_bench", os.path.join(ROOT, "scripts", "position_walk_bench.py"))
pwb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pwb)


@pytest.mark.parametrize("d, k", pwb.CONFIGS)
def test_the_three_codes_hold_the_same_rows(d, k):
    n = 64
    x = pwb.make_rows(n, d, k, seed=1)
    assert bool(((x != 0).sum(1) == k).all())
    assert bool(((x != 0).view(n, d // 32, 32).any(-1)).all())  # every 32-bit word non-empty (v6's fast rows)
    f = pwb.formats(x, k)
    # bitmap: bit j of word w <=> channel 32 w + j; values ascending by channel, fp16 pairs in int32 words
    bm, vals, s = f["bitmap"]
    assert s == k
    bits = bm.view(torch.int32).long() & 0xFFFFFFFF
    mask = ((bits.unsqueeze(-1) >> torch.arange(32)) & 1).bool().view(n, d)
    v = vals.view(torch.float16)[:, :k]
    dense = torch.zeros(n, d, dtype=torch.float16)
    dense[mask] = v.reshape(-1)
    assert torch.equal(dense, x)
    # gap codes: the reference decoder
    codes, gvals, gs = f["gap"]
    assert gs == gapcode.slots(d, k)
    g = gapcode.GapKV(codes.view(torch.uint8), gvals.view(torch.float16)[:, :gs], d, k)
    assert torch.equal(gapcode.decode(g), x)
    # channel bytes, 4 per int32 word (byte j % 4 of word j // 4 = value j)
    idx, ivals, _ = f["index"]
    ch = idx.view(torch.uint8)[:, :k].long()
    assert torch.equal(torch.zeros(n, d, dtype=torch.float16).scatter(1, ch, ivals.view(torch.float16)[:, :k]), x)


def test_expected_follows_the_kernels_tile_order():
    x = pwb.make_rows(32 * 5, 64, 19, seed=2)
    out = pwb.expected(x, blocks=1, threads=64)  # 2 warps: tiles 0, 2, 4 -> warp 0; 1, 3 -> warp 1
    rs = x.float().sum(1).view(5, 32)
    assert torch.allclose(out[:32], rs[0] + rs[2] + rs[4]) and torch.allclose(out[32:], rs[1] + rs[3])


def test_word_major_puts_word_i_of_a_tiles_rows_side_by_side():
    n, w = 96, 5
    words = torch.arange(n * w, dtype=torch.int32).view(n, w)
    flat = pwb.word_major(words)
    for r in (0, 31, 32, 77, 95):
        for i in range(w):
            # what the kernels read: pos[(tile * NP + i) * 32 + lane]
            assert int(flat[((r // 32) * w + i) * 32 + r % 32]) == int(words[r, i])
