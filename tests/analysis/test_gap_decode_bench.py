"""CPU tests of ``scripts/gap_decode_bench.py`` (the GPU timing of the gap-code decode prototype): the shapes span
the classes of issue #15, the inputs are the top-k pruned rows in the kernel's layout, the reference is attention."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import torch

from mustafar import gapcode
from mustafar.format import kept_count

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("gap_decode_bench", os.path.join(ROOT, "scripts", "gap_decode_bench.py"))
gdb = importlib.util.module_from_spec(spec)
sys.modules["gap_decode_bench"] = gdb  # dataclasses look their module up
spec.loader.exec_module(gdb)


def test_shapes_span_the_issue_classes():
    names = [s.name for s in gdb.SHAPES]
    assert len(set(names)) == len(names)
    assert {s.h_q // s.h_kv for s in gdb.SHAPES} >= {1, 3, 4, 7, 8}
    assert {s.d for s in gdb.SHAPES} == {64, 128}
    assert {s.sparsity for s in gdb.SHAPES} == {0.5, 0.6, 0.7, 0.8}
    assert {s.dtype for s in gdb.SHAPES} == {"float16", "bfloat16"}
    assert any(s.t % 32 for s in gdb.SHAPES) and any(s.b == 1 for s in gdb.SHAPES)


def test_gap_inputs_hold_the_pruned_rows():
    x = torch.randn(2, 3, 45, 64, dtype=torch.float16)
    k = kept_count(64, 0.7)
    codes, vals, dense = gdb.gap_inputs(x, k, chunk=50)  # several chunks
    idx = x.abs().float().topk(k, dim=-1).indices
    assert torch.equal(dense, torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx)))
    s = gapcode.slots(64, k, 4)
    assert codes.shape == (2, 3, 2, (s + 7) // 8, 32) and vals.shape == (2, 3, 2, s // 4, 32, 4)
    assert torch.equal(gapcode.decode(gapcode.from_tile_major(codes, vals, 45, 64, k)), dense)


def test_reference_is_attention_with_gqa_and_left_padding():
    q = torch.randn(2, 6, 64)
    k, v = torch.randn(2, 2, 40, 64), torch.randn(2, 2, 40, 64)
    scale = 1 / math.sqrt(64)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True).squeeze(2)
    assert torch.allclose(gdb.reference(q, k, v, scale), want, atol=1e-5)
    ks = torch.tensor([5, 0])
    got = gdb.reference(q, k, v, scale, ks)
    assert torch.allclose(got[0], sdpa(q[:1].unsqueeze(2), k[:1, :, 5:], v[:1, :, 5:], scale=scale,
                                       enable_gqa=True).squeeze(2)[0], atol=1e-5)
    assert torch.allclose(got[1], want[1], atol=1e-5)


def test_list_prints_every_shape(capsys):
    assert gdb.main(["--list"]) == 0
    assert capsys.readouterr().out.split() == [s.name for s in gdb.SHAPES]
