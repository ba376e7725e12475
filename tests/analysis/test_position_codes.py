"""CPU tests of ``mustafar.analysis.position_codes`` (bytes of position codes for the kept channels)."""

from __future__ import annotations

import pytest
import torch

from mustafar.analysis import position_codes as pc


def test_gap_escapes_by_hand():
    # D = 64, kept channels 0, 16, 17, 40, 63: gaps 0, 15, 0, 22, 22 -> escapes 0 + 1 + 0 + 1 + 1
    ch = torch.tensor([[0, 16, 17, 40, 63], [59, 60, 61, 62, 63]])
    assert pc.gap_escapes(ch).tolist() == [3, 3]  # second row: first gap 59 -> 59 // 15 = 3
    assert pc.filler_slots(ch).tolist() == [2, 3]  # gaps 15 / 22 / 22 -> 0 + 1 + 1; 59 -> 3
    with pytest.raises(ValueError, match="ascending"):
        pc.gap_escapes(torch.tensor([[3, 3]]))
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        pc.gap_escapes(torch.tensor([1, 2]))


def test_kept_channels_is_the_sorted_top_k_and_checks_k():
    x = torch.randn(5, 7, 32)
    ch = pc.kept_channels(x, 10)
    assert ch.shape == (35, 10) and bool((ch[:, 1:] > ch[:, :-1]).all())
    rows = x.reshape(-1, 32).abs()
    kept = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, ch, True)
    assert bool((rows[kept].reshape(35, 10).min(1).values >= rows.masked_fill(kept, -1).max(1).values).all())
    for bad in (0, 33, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            pc.kept_channels(x, bad)


def test_row_stats_bytes_and_overflow():
    # every row keeps channels {0, 20}: one escape each (gap 19 before channel 20)
    x = torch.zeros(6, 64)
    x[:, 0] = 5.0
    x[:, 20] = -4.0
    x[:, 1:20] = torch.rand(6, 19) * 0.1
    r = pc.row_stats(x, 2, capacities=(0, 1))
    assert r["mean_escapes"] == 1.0 and r["max_escapes"] == 1 and r["rows_without_escape"] == 0.0
    # one 32-bit code word (the walks read whole words), every row overflows at E = 0 (the gap of 19 needs one
    # escape and one filler)
    assert r["capacities"][0] == {"gap_bytes": 4, "overflow": 1.0, "filler_overflow": 1.0}
    assert r["capacities"][1] == {"gap_bytes": 4, "overflow": 0.0, "filler_overflow": 0.0}
    assert pc.code_bytes(128, 38, 5)["gap_nibbles"] == 24  # 43 codes: 6 words
    assert r["mean_fillers"] == 1.0 and r["max_fillers"] == 1
    assert r["bitmap_bytes"] == 8 and r["byte_index_bytes"] == 2
    b = pc.row_bytes(128, 38, 2)
    assert b["bitmap"]["bytes"] == 16 + 76 and b["byte_index"]["bytes"] == 38 + 76 and b["gap_nibbles"]["bytes"] == 20 + 76
    assert b["bitmap"]["of_dense"] == pytest.approx(92 / 256)
