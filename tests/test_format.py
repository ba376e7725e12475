"""The bitmap format: exact round trips, byte accounting, validation (mustafar.format)."""

from __future__ import annotations

import math

import pytest
import torch

from mustafar import format as fmt
from mustafar.ops import reference as ref

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # the GPU machine may lack hypothesis
    HAVE_HYPOTHESIS = False

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_encode_topk_round_trip_and_popcount(dtype, d):
    x = _rand((2, 3, 17, d), dtype, seed=d)
    for s in (0.0, 0.3, 0.5, 0.7):
        sp = fmt.encode_topk(x, s)
        k = fmt.kept_count(d, s)
        assert sp.kept == k and sp.shape == tuple(x.shape) and sp.num_tokens == 17
        assert torch.equal(ref.popcount(sp.bitmap), torch.full((2, 3, 17), k))
        mask = ref.topk_mask(x, k)
        assert torch.equal(sp.to_dense(), torch.where(mask, x, torch.zeros_like(x)))


def test_exact_for_any_pattern_with_nonfinite():
    x = _rand((3, 9, 128), torch.float32, seed=1)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.4
    x[0, 0, 3], x[0, 0, 4], x[1, 2, 100] = float("nan"), float("inf"), -float("inf")
    mask[0, 0, 3] = mask[0, 0, 4] = mask[1, 2, 100] = True
    x[2, 1, 5] = 0.0
    mask[2, 1, 5] = True  # a stored zero
    sp = fmt.encode(x, mask)
    assert sp.kept == int(mask.sum(-1).max())
    dense = sp.to_dense()
    want = torch.where(mask, x, torch.zeros_like(x))
    assert torch.equal(dense.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(dense), torch.nan_to_num(want))
    assert torch.equal(ref.popcount(sp.bitmap), mask.sum(-1))
    # padding slots past popcount are exactly 0
    slots = torch.arange(sp.kept).expand_as(sp.values)
    assert (sp.values[slots >= mask.sum(-1, keepdim=True)] == 0).all()


def test_default_mask_counts_nan_as_stored():
    x = _rand((1, 4, 64), torch.float16, seed=3)
    x[0, 1, :10] = 0
    x[0, 2, 7] = float("nan")
    sp = fmt.encode(x)
    assert ref.popcount(sp.bitmap)[0].tolist() == [64, 54, 64, 64]
    assert torch.isnan(sp.to_dense()[0, 2, 7])


if HAVE_HYPOTHESIS:

    @settings(max_examples=25, deadline=None)
    @given(
        t=st.integers(1, 6),
        w=st.integers(1, 3),
        p=st.floats(0.0, 1.0),
        seed=st.integers(0, 2**31 - 1),
        dtype=st.sampled_from(DTYPES),
    )
    def test_round_trip_hypothesis(t, w, p, seed, dtype):
        d = 64 * w
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(t, d, generator=g) * 10).to(dtype)
        mask = torch.rand(t, d, generator=g) < p
        sp = fmt.encode(x, mask)
        assert torch.equal(sp.to_dense(), torch.where(mask, x, torch.zeros_like(x)))
        assert torch.equal(ref.popcount(sp.bitmap), mask.sum(-1))

else:  # pragma: no cover

    def test_round_trip_hypothesis():
        pytest.skip("hypothesis not installed")


def test_sparsekv_slicing_and_nbytes():
    x = _rand((2, 3, 20, 128), torch.float16, seed=4)
    sp = fmt.encode_topk(x, 0.7)
    assert sp.nbytes == 2 * 3 * 20 * (16 + 2 * 38)
    part = sp[5:9]
    assert part.num_tokens == 4 and len(part) == 4
    assert torch.equal(part.to_dense(), sp.to_dense()[..., 5:9, :])
    assert part.nbytes == 2 * 3 * 4 * 92
    with pytest.raises(ValueError):
        sp[0]


@pytest.mark.parametrize("d", [32, 96, 100])
def test_bad_head_dim_raises_naming_d(d):
    x = _rand((2, 4, d), torch.float32, seed=5)
    with pytest.raises(ValueError, match=f"D={d}"):
        fmt.encode(x)
    with pytest.raises(ValueError, match=f"D={d}"):
        fmt.encode_topk(x, 0.5)


def test_sparsekv_validation():
    with pytest.raises(ValueError):
        fmt.SparseKV(torch.zeros(3, 2, dtype=torch.int32), torch.zeros(3, 5), 128)
    with pytest.raises(ValueError):
        fmt.SparseKV(torch.zeros(3, 1, dtype=torch.int64), torch.zeros(3, 5), 128)
    with pytest.raises(ValueError):
        fmt.SparseKV(torch.zeros(3, 2, dtype=torch.int64), torch.zeros(4, 5), 128)


def test_kept_count_round_half_up():
    assert fmt.kept_count(128, 0.7) == 38
    assert fmt.kept_count(128, 0.5) == 64
    assert fmt.kept_count(64, 0.7) == 19  # 44.8 -> 45 pruned
    assert fmt.kept_count(64, 0.0) == 64
    with pytest.raises(ValueError):
        fmt.kept_count(64, 1.5)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("s,paper", [(0.5, 0.648), (0.7, 0.455)])
def test_bytes_ratio_at_or_below_paper(d, s, paper):
    ours = fmt.format_bytes_ratio(d, s, torch.float16)
    assert ours <= paper
    assert ours == pytest.approx((8 * (d // 64) + 2 * fmt.kept_count(d, s)) / (2 * d))


def test_bytes_ratio_exact_values():
    assert fmt.format_bytes_ratio(128, 0.7) == pytest.approx(92 / 256)
    assert fmt.format_bytes_ratio(128, 0.5) == pytest.approx(0.5625)
    assert fmt.nbytes_dense((2, 3, 4, 128), torch.float16) == 2 * 3 * 4 * 128 * 2
    assert fmt.format_bytes(128, 0.7, torch.float32) == 16 + 4 * 38


def test_paper_layout_model_matches_paper():
    # the paper measured 0.648 / 0.455 (D=128, fp16) with its upstream encoder on real caches
    assert fmt.paper_format_bytes_ratio(128, 0.5) == pytest.approx(0.648, abs=0.005)
    assert fmt.paper_format_bytes_ratio(128, 0.7) == pytest.approx(0.455, abs=0.01)
    for d in (64, 128):
        for s in (0.5, 0.7):
            assert fmt.format_bytes_ratio(d, s) < fmt.paper_format_bytes_ratio(d, s)
    # the exact per-pattern count agrees with the expectation on random top-k data
    x = _rand((4, 512, 128), torch.float16, seed=6)
    sp = fmt.encode_topk(x, 0.7)
    exact = fmt.paper_format_bytes(128, bitmap=sp.bitmap) / 256
    assert exact == pytest.approx(fmt.paper_format_bytes_ratio(128, 0.7), abs=0.01)
    assert math.isfinite(exact)


# ------------------------------------------------------------------------------ FP8 values
FP8 = torch.float8_e4m3fn


def test_quantize_fp8_rule_by_hand():
    v = torch.tensor([[448.0 * 3, -1.5, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1e-9, -2e-9, 0.0, 0.0]])
    q8, s = fmt.quantize_fp8(v)
    assert q8.dtype == FP8 and s.dtype == torch.float16 and s.shape == (3,)
    assert s.tolist() == [3.0, 1.0, 1.0]  # amax / 448 = 3; an all-zero row and an underflowing scale -> 1
    assert q8[0].float().tolist() == [448.0, -0.5, 0.0, 0.6875]  # 2/3 rounds to the nearest e4m3 (0.6875)
    assert q8[1].float().tolist() == [0.0] * 4
    assert q8[2].float().tolist() == [0.0] * 4  # 1e-9 / 1 is below the smallest e4m3 subnormal


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_fp8_matches_the_rule_and_bounds_the_error(dtype):
    x = (_rand((3, 50, 38), dtype, seed=60) * torch.logspace(-6, 4, 50)[None, :, None]).to(dtype)
    x[0, 3, 5:] = 0  # padding slots stay 0
    q8, s = fmt.quantize_fp8(x)
    amax = x.float().abs().amax(-1)
    want_s = (amax / 448).to(torch.float16)
    want_s = torch.where(want_s == 0, torch.ones_like(want_s), want_s)
    assert torch.equal(s, want_s)
    want_q = (x.float() / want_s.float()[..., None]).clamp(-448, 448).to(FP8)
    assert torch.equal(q8.view(torch.uint8), want_q.view(torch.uint8))
    assert (q8[0, 3, 5:].float() == 0).all()
    deq = q8.float() * s.float()[..., None]
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for values within 8x of the row's amax, in rows whose
    # scale is a normal float16 (amax >= 448 * 2^-14); the clamp adds at most the scale's rounding (2^-11)
    normal = (amax >= 448 * 2 ** -14)[..., None]
    big = (x.float().abs() >= amax[..., None] / 8) & normal
    assert big.sum() > 1000
    err = (deq - x.float()).abs()
    assert (err[big] <= x.float().abs()[big] * (2 ** -4 + 2 ** -10)).all()
    # rows so small that amax / 448 underflows float16 get s = 1: their values round to e4m3 directly
    tiny = amax < 448 * 2 ** -25
    assert tiny.any() and (s[tiny] == 1).all()


@pytest.mark.parametrize("d", [64, 128])
def test_encode_topk_fp8(d):
    x = _rand((2, 3, 17, d), torch.bfloat16, seed=61)
    plain = fmt.encode_topk(x, 0.7)
    sp = fmt.encode_topk(x, 0.7, value_dtype=FP8)
    assert torch.equal(sp.bitmap, plain.bitmap)  # the bitmap of the unquantized encoding
    q8, s = fmt.quantize_fp8(plain.values)
    assert sp.values.dtype == FP8 and torch.equal(sp.values.view(torch.uint8), q8.view(torch.uint8))
    assert torch.equal(sp.scale, s)
    assert sp.dtype == FP8 and sp.kept == plain.kept and sp.shape == plain.shape
    # dense: dequantized values in dtype (default float16)
    deq = fmt.decode(fmt.SparseKV(plain.bitmap, q8.float() * s.float()[..., None], d))
    assert torch.equal(sp.to_dense(torch.float32), deq)
    assert sp.to_dense().dtype == torch.float16 and torch.equal(sp.to_dense(), deq.half())
    assert torch.equal(fmt.decode(sp, torch.bfloat16), deq.bfloat16())
    assert torch.equal(plain.to_dense(torch.float32), plain.to_dense().float())  # dtype on a plain SparseKV
    # slicing along T slices the scale
    part = sp[4:9]
    assert torch.equal(part.scale, sp.scale[..., 4:9])
    assert torch.equal(part.to_dense(), sp.to_dense()[..., 4:9, :])
    with pytest.raises(ValueError, match="value_dtype"):
        fmt.encode_topk(x, 0.7, value_dtype=torch.int8)


def test_sparsekv_fp8_nbytes_and_validation():
    x = _rand((2, 3, 20, 128), torch.float16, seed=62)
    sp = fmt.encode_topk(x, 0.7, value_dtype=FP8)
    assert sp.nbytes == 2 * 3 * 20 * (16 + 38 + 2)
    assert sp[5:9].nbytes == 2 * 3 * 4 * 56
    with pytest.raises(ValueError, match="needs scale"):
        fmt.SparseKV(sp.bitmap, sp.values, 128)
    with pytest.raises(ValueError, match="scale given"):
        fmt.SparseKV(sp.bitmap, sp.values.half(), 128, sp.scale)
    with pytest.raises(ValueError, match="scale.dtype"):
        fmt.SparseKV(sp.bitmap, sp.values, 128, sp.scale.float())
    with pytest.raises(ValueError, match="scale shape"):
        fmt.SparseKV(sp.bitmap, sp.values, 128, sp.scale[..., :3])


def test_fp8_byte_accounting():
    assert fmt.format_bytes(128, 0.7, value_dtype=FP8) == 16 + 38 + 2
    assert fmt.format_bytes_ratio(128, 0.7, value_dtype=FP8) == pytest.approx(56 / 256)
    assert fmt.format_bytes_ratio(128, 0.7, torch.bfloat16, FP8) == pytest.approx(56 / 256)
    assert fmt.format_bytes_ratio(128, 0.7, torch.float32, FP8) == pytest.approx(56 / 512)
    assert fmt.format_bytes(64, 0.5, value_dtype=FP8) == 8 + 32 + 2
    # the unquantized accounting is unchanged
    assert fmt.format_bytes(128, 0.7, value_dtype=None) == fmt.format_bytes(128, 0.7) == 92
    with pytest.raises(ValueError, match="value_dtype"):
        fmt.format_bytes(128, 0.7, value_dtype=torch.float16)
