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
    f8 = [s for s in gdb.SHAPES if s.values == "fp8_e4m3"]  # the FP8 target shapes (fp16 models)
    assert {(s.h_q // s.h_kv, s.b, s.t, s.sparsity) for s in f8} >= {(1, 8, 16384, 0.7), (4, 8, 16384, 0.7)}
    assert {s.dtype for s in f8} == {"float16"} and {s.values for s in gdb.SHAPES} == {"model", "fp8_e4m3"}
    assert any(s.t % 32 for s in gdb.SHAPES) and any(s.b == 1 for s in gdb.SHAPES)


def test_gap_inputs_hold_the_pruned_rows():
    x = torch.randn(2, 3, 45, 64, dtype=torch.float16)
    k = kept_count(64, 0.7)
    codes, vals, dense, scales = gdb.gap_inputs(x, k, chunk=50)  # several chunks
    idx = x.abs().float().topk(k, dim=-1).indices
    assert torch.equal(dense, torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx)))
    s = gapcode.slots(64, k, 4)
    assert codes.shape == (2, 3, 2, (s + 7) // 8, 32) and vals.shape == (2, 3, 2, s // 4, 32, 4)
    assert torch.equal(gapcode.decode(gapcode.from_tile_major(codes, vals, 45, 64, k)), dense)
    assert scales is None


def test_gap_inputs_fp8_quantize_per_token_with_the_project_rule():
    from mustafar.ops.reference import quantize_fp8

    x = torch.randn(2, 3, 45, 128, dtype=torch.float16) * 3
    k = kept_count(128, 0.7)
    codes, vals, dense, scales = gdb.gap_inputs(x, k, chunk=70, fp8=True)
    s = gapcode.slots(128, k, 4)
    assert vals.dtype == torch.float8_e4m3fn and vals.shape == (2, 3, 2, s // 4, 32, 4)
    assert scales.dtype == torch.float16 and scales.shape == (2, 3, 2, 32)
    assert torch.equal(scales[:, :, 1, 13:], torch.zeros(2, 3, 19, dtype=torch.float16))  # padding rows
    idx = x.abs().float().topk(k, dim=-1).indices
    kept = x.gather(-1, idx)
    q8, sc = quantize_fp8(kept)  # the rule over the kept values (fillers are 0: the same maximum)
    assert torch.equal(scales.reshape(2, 3, 64)[..., :45], sc)
    want = torch.zeros(x.shape).scatter(-1, idx, q8.float() * sc.float().unsqueeze(-1))
    assert dense.dtype == torch.float32 and torch.equal(dense, want)
    # the stored bytes decode (times the row's scale) to the same rows
    g = gapcode.from_tile_major(codes, vals.view(torch.uint8), 45, 128, k)
    deq = gapcode.GapKV(g.codes, g.values.view(torch.float8_e4m3fn).float() * sc.float().unsqueeze(-1), 128, k)
    assert torch.equal(gapcode.decode(deq), want)
    assert not torch.equal(dense, torch.zeros_like(x).float().scatter(-1, idx, kept.float()))  # really quantized


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
