"""Compiled CPU ops (torch.ops.mustafar.*) against the plain-torch reference, and input validation.

Tolerances (sparse_decode, compared with the reference computed in float64 from the same stored
values): float32 atol = rtol = 1e-5; float16 / bfloat16 atol = rtol = 1e-2 (the output is rounded to
the input dtype: 2^-11 / 2^-8 relative). FP8 stored values are compared from the same FP8 bits and
scales (their dequantization is exact in float32), so the same tolerances hold. Encode/decode/top-k must
match the reference bit for bit.
"""

from __future__ import annotations

import itertools
import math
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

from mustafar.ops import dispatch as ops
from mustafar.ops import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def _compiled():
    # a broken build must fail here, not silently fall back to the reference
    ops.set_backend_mode("compiled")
    assert ops.backend("cpu") == "cpu"
    yield
    ops.set_backend_mode(None)  # MUSTAFAR_BACKEND again, read at the next use


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _kept(d, s):
    return d - 1 if s == "all-but-one" else d - math.floor(s * d + 0.5)


def _kept_for(d, s):
    return 1 if s == "all-but-one" else _kept(d, s)


def _make_case(b, g, d, t, dtype, sparsity, t_w, seed, h_kv=2):
    gen = _gen(seed)
    q = torch.randn(b, h_kv * g, d, generator=gen).to(dtype)
    k_dense = torch.randn(b, h_kv, t, d, generator=gen).to(dtype)
    v_dense = torch.randn(b, h_kv, t, d, generator=gen).to(dtype)
    k = _kept_for(d, sparsity)
    kb, kv = ops.prune_encode_topk(k_dense, k)
    vb, vv = ops.prune_encode_topk(v_dense, max(1, k - 3))  # k_k != k_v
    kw = torch.randn(b, h_kv, t_w, d, generator=gen).to(dtype)
    vw = torch.randn(b, h_kv, t_w, d, generator=gen).to(dtype)
    return q, kb, kv, vb, vv, kw, vw


def _ref64(q, kb, kv, vb, vv, kw, vw, kv_start=None, scale=None):
    return ref.sparse_decode(q.double(), kb, kv.double(), vb, vv.double(), kw.double(), vw.double(),
                             kv_start, scale)


# A deterministic sample of the full grid (the full product is ~1400 cases: too slow on 2 cores).
_GRID = list(itertools.product([1, 7, 111, 257], [1, 3], [1, 3, 4], [64, 128], DTYPES,
                               [0.0, 0.3, 0.5, 0.7, "all-but-one"], [0, 5]))
_CASES = random.Random(1234).sample(_GRID, 36)


@pytest.mark.parametrize("t,b,g,d,dtype,sparsity,t_w", _CASES)
def test_sparse_decode_matches_reference(t, b, g, d, dtype, sparsity, t_w):
    seed = zlib.crc32(repr((t, b, g, d, dtype, sparsity, t_w)).encode())
    case = _make_case(b, g, d, t, dtype, sparsity, t_w, seed)
    starts = torch.randint(0, t + t_w + 2, (b,), generator=_gen(seed + 1), dtype=torch.int32)
    for kv_start in (None, starts):
        out = ops.sparse_decode(*case, kv_start=kv_start)
        want = _ref64(*case, kv_start=kv_start)
        assert out.dtype == dtype and out.shape == case[0].shape
        torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_decode_window_only_and_compressed_only(dtype):
    q, kb, kv, vb, vv, kw, vw = _make_case(2, 3, 128, 9, dtype, 0.7, 4, seed=7)
    e_b, e_v = kb[:, :, :0], kv[:, :, :0]
    out = ops.sparse_decode(q, e_b, e_v, e_b, vv[:, :, :0], kw, vw)
    torch.testing.assert_close(out.double(), _ref64(q, e_b, e_v, e_b, vv[:, :, :0], kw, vw),
                               atol=TOL[dtype], rtol=TOL[dtype])
    out = ops.sparse_decode(q, kb, kv, vb, vv)  # no window (None)
    torch.testing.assert_close(out.double(), _ref64(q, kb, kv, vb, vv, kw[:, :, :0], vw[:, :, :0]),
                               atol=TOL[dtype], rtol=TOL[dtype])


def test_sparse_decode_all_masked_is_zero_and_rest_unaffected():
    q, kb, kv, vb, vv, kw, vw = _make_case(3, 2, 64, 30, torch.float32, 0.5, 3, seed=8)
    starts = torch.tensor([0, 33, 100], dtype=torch.int32)
    out = ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, kv_start=starts)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    assert out[0].abs().max() > 0
    full = ops.sparse_decode(q, kb, kv, vb, vv, kw, vw)
    torch.testing.assert_close(out[0], full[0], atol=1e-6, rtol=1e-6)


def test_sparse_decode_long_sequence_split_over_threads():
    # long enough that the CPU kernel splits T into chunks and merges them
    case = _make_case(1, 3, 64, 3000, torch.float32, 0.7, 32, seed=9, h_kv=1)
    starts = torch.tensor([1234], dtype=torch.int32)
    for kv_start in (None, starts):
        torch.testing.assert_close(ops.sparse_decode(*case, kv_start=kv_start).double(),
                                   _ref64(*case, kv_start=kv_start), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsity_zero_equals_dense_sdpa(dtype):
    b, h_kv, g, t, d = 2, 2, 3, 40, 128
    gen = _gen(10)
    q = torch.randn(b, h_kv * g, d, generator=gen).to(dtype)
    k = torch.randn(b, h_kv, t, d, generator=gen).to(dtype)
    v = torch.randn(b, h_kv, t, d, generator=gen).to(dtype)
    kb, kv = ops.prune_encode_topk(k[:, :, :32], d)
    vb, vv = ops.prune_encode_topk(v[:, :, :32], d)
    out = ops.sparse_decode(q, kb, kv, vb, vv, k[:, :, 32:], v[:, :, 32:])
    kr = k.float().repeat_interleave(g, dim=1)  # [B, H_q, T, D]
    vr = v.float().repeat_interleave(g, dim=1)
    want = F.scaled_dot_product_attention(q.float()[:, :, None], kr, vr)[:, :, 0]
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_token_permutation_invariance():
    q, kb, kv, vb, vv, kw, vw = _make_case(2, 4, 128, 50, torch.float32, 0.7, 0, seed=11)
    perm = torch.randperm(50, generator=_gen(12))
    out = ops.sparse_decode(q, kb, kv, vb, vv, kw, vw)
    outp = ops.sparse_decode(q, kb[:, :, perm], kv[:, :, perm], vb[:, :, perm], vv[:, :, perm], kw, vw)
    torch.testing.assert_close(out, outp, atol=1e-6, rtol=1e-5)


def test_strided_capacity_buffers():
    # the cache slices [B, H_kv, capacity, *] buffers along T: leading dims are not contiguous
    q, kb, kv, vb, vv, kw, vw = _make_case(2, 3, 64, 20, torch.float16, 0.5, 4, seed=13)

    def cap(x, extra=11):
        buf = torch.zeros(*x.shape[:2], x.shape[2] + extra, x.shape[3], dtype=x.dtype)
        buf[:, :, : x.shape[2]] = x
        return buf[:, :, : x.shape[2]]

    args = [cap(a) for a in (kb, kv, vb, vv, kw, vw)]
    assert not args[0].is_contiguous()
    out = ops.sparse_decode(q, *args)
    torch.testing.assert_close(out, ops.sparse_decode(q, kb, kv, vb, vv, kw, vw), atol=0, rtol=0)
    # batch-transposed q and a custom scale
    out2 = ops.sparse_decode(q.transpose(0, 1).contiguous().transpose(0, 1), *args, scale=0.3)
    torch.testing.assert_close(out2.double(), _ref64(q, kb, kv, vb, vv, kw, vw, scale=0.3), atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------- encode / top-k
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_prune_encode_topk_bit_exact_with_ties_and_nonfinite(dtype, d):
    gen = _gen(d)
    x = torch.randint(-3, 4, (3, 13, d), generator=gen).to(dtype)  # many ties, including +-0
    x[0, 0, 5], x[0, 0, 9] = float("nan"), -float("inf")
    x[1, 2] = 1.0  # a row of equal magnitudes
    x[2, 3] = torch.randn(d, generator=gen).to(dtype)
    for k in (0, 1, d // 3, d // 2, d - 1, d):
        b1, v1 = ops.prune_encode_topk(x, k)
        b2, v2 = ref.prune_encode_topk(x, k)
        assert torch.equal(b1, b2), k
        assert torch.equal(v1.isnan(), v2.isnan()) and torch.equal(v1.nan_to_num(), v2.nan_to_num()), k
        assert torch.equal(ref.popcount(b1), torch.full((3, 13), k))
    b, _ = ops.prune_encode_topk(x, 2)
    assert b[0, 0, 0].item() == (1 << 5) | (1 << 9)  # NaN and inf are the largest magnitudes
    assert b[1, 2].tolist()[-1] & (3 << 62) or d == 64  # equal magnitudes: highest channels kept


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_decode_compiled_vs_reference(dtype):
    gen = _gen(20)
    x = torch.randn(2, 5, 7, 192, generator=gen).to(dtype)
    mask = torch.rand(x.shape, generator=gen) < 0.35
    k = int(mask.sum(-1).max()) + 2
    b1, v1 = ops.encode_bitmap(x, mask, k)
    b2, v2 = ref.encode_bitmap(x, mask, k)
    assert torch.equal(b1, b2) and torch.equal(v1, v2)
    assert torch.equal(ops.decode_bitmap(b1, v1, 192), ref.decode_bitmap(b2, v2, 192))
    assert torch.equal(ops.decode_bitmap(b1, v1, 192), torch.where(mask, x, torch.zeros_like(x)))
    with pytest.raises(ValueError, match="k=3"):
        ops.encode_bitmap(x, mask, 3)


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_bad_inputs_raise_value_error(backend):
    ops.set_backend_mode(backend)
    q, kb, kv, vb, vv, kw, vw = _make_case(2, 2, 64, 5, torch.float32, 0.5, 2, seed=30)
    kq, ks = ref.quantize_fp8(kv)
    vq, vs = ref.quantize_fp8(vv)
    x = torch.randn(4, 64)
    cases = [
        (lambda: ops.prune_encode_topk(x.double(), 3), "dtype"),
        (lambda: ops.prune_encode_topk(torch.randn(4, 96), 3), "D=96"),
        (lambda: ops.prune_encode_topk(x, 65), "k=65"),
        (lambda: ops.prune_encode_topk(x, -1), "k=-1"),
        (lambda: ops.encode_bitmap(x, (x > 0).int(), 64), "bool"),
        (lambda: ops.encode_bitmap(x, torch.ones(4, 128, dtype=torch.bool), 64), "shape"),
        (lambda: ops.decode_bitmap(kb, kv, 128), "head_dim"),
        (lambda: ops.decode_bitmap(kb.int(), kv, 64), "int64"),
        (lambda: ops.sparse_decode(q[0], kb, kv, vb, vv, kw, vw), "q must be"),
        (lambda: ops.sparse_decode(q.half(), kb, kv, vb, vv, kw, vw), "dtype"),
        (lambda: ops.sparse_decode(q[:, :3], kb, kv, vb, vv, kw, vw), "H_q=3"),
        (lambda: ops.sparse_decode(q, kb, kv[:, :, :4], vb, vv, kw, vw), "k_values"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw[..., :32], vw), "k_window"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, None), "both"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, kv_start=torch.zeros(2)), "kv_start"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, kv_start=torch.zeros(3, dtype=torch.int32)), "kv_start"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, scale=float("nan")), "scale"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, kernel="v9"), "kernel='v9'"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, kernel=None), "kernel=None"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, pdl=1), "pdl=1"),
        # FP8 values and their scales
        (lambda: ops.sparse_decode(q, kb, kq, vb, vv, kw, vw), "k_scale is None"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vq, kw, vw), "v_scale is None"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, k_scale=ks), "k_scale given"),
        (lambda: ops.sparse_decode(q, kb, kq, vb, vv, kw, vw, k_scale=ks, v_scale=ks), "v_scale given"),
        (lambda: ops.sparse_decode(q, kb, kq, vb, vv, kw, vw, k_scale=ks.float()), "k_scale.dtype"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vq, kw, vw, v_scale=vs[:, :, :3]), "v_scale shape"),
        (lambda: ops.sparse_decode(q, kb, kv.to(torch.int8), vb, vv, kw, vw), "k_values.dtype"),
        (lambda: ops.sparse_decode(q, kb, kv.half(), vb, vv, kw, vw), "k_values.dtype"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw.to(FP8), vw), "k_window.dtype"),
        # lengths
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, lengths=torch.tensor([1, 1])), "lengths"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, lengths=torch.tensor([1], dtype=torch.int32)), "lengths"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, lengths=[1, 1]), "lengths"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, lengths=torch.tensor([6, 0], dtype=torch.int32)), "n_c=6"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, lengths=torch.tensor([-1, 0], dtype=torch.int32)), "n_c=-1"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, lengths=torch.tensor([5, 3], dtype=torch.int32)), "n_w=3"),
        (lambda: ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, lengths=torch.tensor([0, -2], dtype=torch.int32)), "n_w=-2"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


def test_sparse_decode_kernel_argument_on_cpu():
    """CUDA kernel names apply to CUDA tensors: the CPU kernel takes kernel="auto" only (any pdl); the
    reference ignores both arguments."""
    case = _make_case(2, 2, 64, 9, torch.float32, 0.5, 2, seed=31)
    want = ops.sparse_decode(*case)
    torch.testing.assert_close(ops.sparse_decode(*case, kernel="auto", pdl=False), want, atol=0, rtol=0)
    for name in ("v4", "v5", "v6", "v6g", "v6k"):
        with pytest.raises(ValueError, match=f"kernel={name} .*CUDA tensors"):
            ops.sparse_decode(*case, kernel=name)
        with pytest.raises(ValueError, match=f"kernel={name} "):
            torch.ops.mustafar.sparse_decode(*case, None, 0.125, variant=name, pdl=True)
    with pytest.raises(ValueError, match="kernel=bogus"):
        torch.ops.mustafar.sparse_decode(*case, None, 0.125, None, None, None, "bogus", True)
    # the schema's defaults: kernel="auto", pdl=True
    torch.testing.assert_close(torch.ops.mustafar.sparse_decode(*case, None, 0.125),
                               ops.sparse_decode(*case, scale=0.125), atol=0, rtol=0)
    ops.set_backend_mode("reference")
    torch.testing.assert_close(ops.sparse_decode(*case, kernel="v6", pdl=False).double(), _ref64(*case),
                               atol=1e-5, rtol=1e-5)


def test_cpp_checks_raise_value_error_directly():
    # the C++ kernels check too (TORCH_CHECK_VALUE -> ValueError) when called without mustafar.ops
    with pytest.raises(ValueError, match="D=96"):
        torch.ops.mustafar.prune_encode_topk(torch.randn(2, 96), 3)
    with pytest.raises(ValueError, match="k=70"):
        torch.ops.mustafar.encode_bitmap(torch.randn(2, 64), torch.ones(2, 64, dtype=torch.bool), 70)
    q, kb, kv, vb, vv, kw, vw = _make_case(1, 2, 64, 5, torch.float32, 0.5, 2, seed=32)
    kq, ks = ref.quantize_fp8(kv)
    sd = torch.ops.mustafar.sparse_decode
    with pytest.raises(ValueError, match="k_scale is None"):
        sd(q, kb, kq, vb, vv, kw, vw, None, 0.1)
    with pytest.raises(ValueError, match="v_scale given"):
        sd(q, kb, kv, vb, vv, kw, vw, None, 0.1, v_scale=ks)
    with pytest.raises(ValueError, match="k_scale.dtype"):
        sd(q, kb, kq, vb, vv, kw, vw, None, 0.1, ks.float())
    with pytest.raises(ValueError, match="n_w=3"):
        sd(q, kb, kv, vb, vv, kw, vw, None, 0.1, lengths=torch.tensor([5, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="lengths must be int32"):
        sd(q, kb, kv, vb, vv, kw, vw, None, 0.1, lengths=torch.tensor([5, 1]))


# --------------------------------------------------------------- sparse_decode v2: FP8, lengths
def _v2_case(b, g, d, t_c, r, dtype, fp8, seed, h_kv=2):
    """A sparse_decode case whose K and/or V values are FP8 (``fp8`` in "", "k", "v", "kv")."""
    q, kb, kv, vb, vv, kw, vw = _make_case(b, g, d, t_c, dtype, 0.7, r, seed, h_kv)
    ks = vs = None
    if "k" in fp8:
        kv, ks = ref.quantize_fp8(kv)
    if "v" in fp8:
        vv, vs = ref.quantize_fp8(vv)
    return [q, kb, kv, vb, vv, kw, vw], {"k_scale": ks, "v_scale": vs}


def _ref64_v2(case, scales, kv_start=None, lengths=None, scale=None):
    q, kb, kv, vb, vv, kw, vw = case
    up = (lambda t: t if t.dtype == FP8 else t.double())
    return ref.sparse_decode(q.double(), kb, up(kv), vb, up(vv), kw.double(), vw.double(), kv_start, scale,
                             lengths=lengths, **scales)


def _poisoned(case, scales, n_c, n_w):
    """Copies with every store row >= n_c and every ring slot outside the n_w visible ones set to NaN / all
    bits, so that a kernel reading them gives NaN."""
    q, kb, kv, vb, vv, kw, vw = (t.clone() for t in case)
    scales = {n: None if t is None else t.clone() for n, t in scales.items()}
    for t in (kb, vb):
        t[:, :, n_c:] = -1
    for t in (kv, vv, *(s for s in scales.values() if s is not None)):
        t[:, :, n_c:] = float("nan")
    r = kw.shape[2]
    if r:
        visible = set(((n_c + torch.arange(n_w)) % r).tolist())
        free = [i for i in range(r) if i not in visible]
        kw[:, :, free] = float("nan")
        vw[:, :, free] = float("nan")
    return [q, kb, kv, vb, vv, kw, vw], scales


_GRID_V2 = list(itertools.product([1, 3, 4, 7, 8], [64, 128, 256], DTYPES, ["", "k", "v", "kv"], [0, 1, 111, 257],
                                  [0, 1, 5, 33]))
_CASES_V2 = random.Random(4321).sample(_GRID_V2, 32)


@pytest.mark.parametrize("g,d,dtype,fp8,t_c,r", _CASES_V2)
def test_sparse_decode_v2_fp8_and_lengths_match_reference(g, d, dtype, fp8, t_c, r):
    """FP8 K / V / both, lengths with n_c in {0, T_c, odd}, n_w in {0, 1, R, other} (a ring whose start
    n_c % R is anything), kv_start masking incl. fully masked sequences; rows and slots outside lengths are
    NaN-poisoned."""
    seed = zlib.crc32(repr((g, d, dtype, fp8, t_c, r)).encode())
    gen = _gen(seed + 1)
    case, scales = _v2_case(2, g, d, t_c, r, dtype, fp8, seed)
    tol = TOL[dtype]
    out = ops.sparse_decode(*case, **scales)  # lengths=None: all T_c rows, window slots in order
    torch.testing.assert_close(out.double(), _ref64_v2(case, scales), atol=tol, rtol=tol)
    n_cs = sorted({0, t_c, int(torch.randint(0, t_c + 1, (1,), generator=gen))})
    n_ws = sorted({0, min(1, r), r, int(torch.randint(0, r + 1, (1,), generator=gen))})
    for n_c, n_w in itertools.product(n_cs, n_ws):
        lengths = torch.tensor([n_c, n_w], dtype=torch.int32)
        pc, ps = _poisoned(case, scales, n_c, n_w)
        starts = torch.randint(0, n_c + n_w + 1, (2,), generator=gen, dtype=torch.int32)
        starts[1] = n_c + n_w  # every position masked -> zeros
        for kv_start in (None, starts):
            got = ops.sparse_decode(*pc, kv_start=kv_start, lengths=lengths, **ps)
            want = _ref64_v2(case, scales, kv_start, lengths)
            assert got.dtype == dtype and not got.isnan().any()
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
            if kv_start is not None:
                assert torch.equal(got[1], torch.zeros_like(got[1]))
        if n_c == t_c and n_w == r:  # the whole buffers: the same bits as lengths=None (slot i = row i iff n_c % R == 0)
            if r == 0 or n_c % r == 0:
                torch.testing.assert_close(ops.sparse_decode(*case, lengths=lengths, **scales), out, atol=0, rtol=0)


def test_sparse_decode_lengths_none_is_full_lengths_with_ring_at_zero():
    case, scales = _v2_case(2, 3, 128, 40, 8, torch.float32, "kv", seed=50)
    out = ops.sparse_decode(*case, **scales)
    torch.testing.assert_close(ops.sparse_decode(*case, lengths=torch.tensor([40, 8], dtype=torch.int32), **scales),
                               out, atol=0, rtol=0)  # 40 % 8 == 0: window row i is slot i
    # a ring starting mid-buffer is the same tokens rotated into order
    rolled = list(case)
    rolled[5], rolled[6] = case[5].roll(3, dims=2), case[6].roll(3, dims=2)  # slot (3 + i) % 8 holds row i
    got = ops.sparse_decode(*rolled[:1], case[1][:, :, :35], case[2][:, :, :35], case[3][:, :, :35],
                            case[4][:, :, :35], *rolled[5:], k_scale=scales["k_scale"][:, :, :35],
                            v_scale=scales["v_scale"][:, :, :35], lengths=torch.tensor([35, 8], dtype=torch.int32))
    want = _ref64_v2([case[0], case[1][:, :, :35], case[2][:, :, :35], case[3][:, :, :35], case[4][:, :, :35],
                      case[5], case[6]], {n: s[:, :, :35] for n, s in scales.items()})
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_sparse_decode_fp8_long_sequence_and_strided_buffers():
    # a T long enough to be split over chunks, FP8 on both sides, from capacity buffers sliced along T
    case, scales = _v2_case(2, 4, 128, 2900, 40, torch.float16, "kv", seed=51, h_kv=1)

    def cap(x, extra=13):
        buf = torch.zeros(*x.shape[:2], x.shape[2] + extra, *x.shape[3:], dtype=x.dtype)
        buf[:, :, : x.shape[2]] = x
        return buf[:, :, : x.shape[2]]

    sliced = [case[0]] + [cap(t) for t in case[1:]]
    sc = {n: cap(s) for n, s in scales.items()}
    assert not sliced[2].is_contiguous() and not sc["k_scale"].is_contiguous()
    lengths = torch.tensor([2777, 29], dtype=torch.int32)
    starts = torch.tensor([1234, 0], dtype=torch.int32)
    for kv_start in (None, starts):
        got = ops.sparse_decode(*sliced, kv_start=kv_start, lengths=lengths, **sc)
        torch.testing.assert_close(got, ops.sparse_decode(*case, kv_start=kv_start, lengths=lengths, **scales),
                                   atol=0, rtol=0)
        torch.testing.assert_close(got.double(), _ref64_v2(case, scales, kv_start, lengths), atol=1e-2, rtol=1e-2)


def test_sparse_decode_fp8_equals_dequantized_dense_values():
    """An FP8 side gives what its dequantized values (float(q8) * float(scale), exact in fp32) give in fp32."""
    case, scales = _v2_case(2, 3, 64, 30, 4, torch.float32, "kv", seed=52)
    deq = list(case)
    deq[2] = ref.dequantize_fp8(case[2], scales["k_scale"])
    deq[4] = ref.dequantize_fp8(case[4], scales["v_scale"])
    lengths = torch.tensor([27, 3], dtype=torch.int32)
    torch.testing.assert_close(ops.sparse_decode(*case, lengths=lengths, **scales),
                               ops.sparse_decode(*deq, lengths=lengths), atol=0, rtol=0)


def test_fake_impls_under_opcheck():
    q, kb, kv, vb, vv, kw, vw = _make_case(1, 2, 64, 6, torch.float32, 0.5, 2, seed=40)
    x = torch.randn(2, 3, 64)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.mustafar.prune_encode_topk.default, (x, 20), test_utils=tests)
    torch.library.opcheck(torch.ops.mustafar.encode_bitmap.default, (x, x > 0, 64), test_utils=tests)
    torch.library.opcheck(torch.ops.mustafar.decode_bitmap.default, (kb, kv, 64), test_utils=tests)
    torch.library.opcheck(torch.ops.mustafar.sparse_decode.default,
                          (q, kb, kv, vb, vv, kw, vw, None, 0.125), test_utils=tests)
    torch.library.opcheck(torch.ops.mustafar.sparse_decode.default,
                          (q, kb, kv, vb, vv, kw, vw, torch.tensor([1], dtype=torch.int32), 0.125, None, None, None,
                           "auto", False),
                          test_utils=tests)
    kq, ks = ref.quantize_fp8(kv)
    vq, vs = ref.quantize_fp8(vv)
    lengths = torch.tensor([4, 1], dtype=torch.int32)
    # test_schema's checking mode has no float8 kernels ("mul_cpu_reduced_float"): FP8 inputs get the fake check
    torch.library.opcheck(torch.ops.mustafar.sparse_decode.default,
                          (q, kb, kq, vb, vq, kw, vw, None, 0.125, ks, vs, lengths), test_utils=("test_faketensor",))
    torch.library.opcheck(torch.ops.mustafar.sparse_decode.default,
                          (q, kb, kv, vb, vv, kw, vw, None, 0.125, None, None, lengths), test_utils=tests)
    # append_decode: declared mutations only (test_schema checks that nothing else is written)
    b, h, d, r, cap = 1, 2, 64, 6, 8
    tok = torch.randn(b, h, 1, d)
    for fp8 in (False, True):
        state = [torch.zeros(b, h, r, d), torch.zeros(b, h, r, d), torch.zeros(b, h, cap, 1, dtype=torch.int64),
                 torch.zeros(b, h, cap, 20, dtype=FP8 if fp8 else torch.float32),
                 torch.zeros(b, h, cap, 1, dtype=torch.int64), torch.zeros(b, h, cap, 30),
                 torch.zeros(b, h, cap, dtype=torch.float16) if fp8 else None, None,
                 torch.tensor([1, 2], dtype=torch.int32)]
        torch.library.opcheck(torch.ops.mustafar.append_decode.default, (tok, tok.clone(), *state, 2, 3),
                              test_utils=("test_faketensor",) if fp8 else tests)


@pytest.mark.parametrize("through", ["wrapper", "torch.ops"])
def test_torch_compile_fullgraph_matches_eager(through):
    """The ops trace under torch.compile(fullgraph=True) (fake kernels registered at load) both through the
    validating Python wrappers and as torch.ops.mustafar.*, and give eager's results."""
    torch._dynamo.reset()
    q, kb, kv, vb, vv, kw, vw = _make_case(2, 2, 64, 20, torch.float32, 0.5, 3, seed=41)
    starts = torch.tensor([0, 4], dtype=torch.int32)
    x = torch.randn(2, 2, 5, 64, generator=_gen(42))
    vq, vs = ref.quantize_fp8(vv)  # V in FP8, a ring window through lengths
    lengths = torch.tensor([17, 2], dtype=torch.int32)
    if through == "wrapper":
        def f(q, kb, kv, vb, vv, kw, vw, starts, x, vq, vs, lengths):
            xb, xv = ops.prune_encode_topk(x, 20)
            dense = ops.decode_bitmap(xb, xv, 64)
            out = ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, kv_start=starts, scale=0.1, kernel="auto", pdl=True)
            out8 = ops.sparse_decode(q, kb, kv, vb, vq, kw, vw, starts, 0.1, v_scale=vs, lengths=lengths)
            return out * 2, dense + 1, out8
    else:
        def f(q, kb, kv, vb, vv, kw, vw, starts, x, vq, vs, lengths):
            xb, xv = torch.ops.mustafar.prune_encode_topk(x, 20)
            dense = torch.ops.mustafar.decode_bitmap(xb, xv, 64)
            out = torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, kw, vw, starts, 0.1, None, None, None, "auto",
                                                   True)
            out8 = torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vq, kw, vw, starts, 0.1, None, vs, lengths)
            return out * 2, dense + 1, out8
    args = (q, kb, kv, vb, vv, kw, vw, starts, x, vq, vs, lengths)
    want = f(*args)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    import mustafar.ops.build as build

    def broken(verbose=False):
        raise RuntimeError("simulated compiler error")

    monkeypatch.setattr(build, "load_extension", broken)
    monkeypatch.setattr(ops, "_state", {"tried": False, "ok": False, "error": None, "warned": False, "cuda": False})
    ops.set_backend_mode("auto")
    with pytest.warns(RuntimeWarning, match="simulated compiler error"):
        assert ops.backend() == "reference"
    x = torch.randn(2, 64)
    b, v = ops.prune_encode_topk(x, 5)  # served by the reference, no second warning
    assert torch.equal(b, ref.prune_encode_topk(x, 5)[0])
    ops.set_backend_mode("compiled")
    with pytest.raises(RuntimeError, match="MUSTAFAR_BACKEND=compiled"):
        ops.backend()
    ops.set_backend_mode("reference")
    assert ops.backend() == "reference"


def test_backend_mode_env_read_once(monkeypatch):
    """MUSTAFAR_BACKEND is read at the first use after set_backend_mode(None), not at every call."""
    monkeypatch.setenv("MUSTAFAR_BACKEND", "reference")
    ops.set_backend_mode(None)
    assert ops.backend() == "reference"
    monkeypatch.setenv("MUSTAFAR_BACKEND", "compiled")
    assert ops.backend() == "reference"  # not re-read
    ops.set_backend_mode(None)
    assert ops.backend() == "cpu"
    monkeypatch.setenv("MUSTAFAR_BACKEND", "bogus")
    ops.set_backend_mode(None)
    with pytest.raises(ValueError, match="MUSTAFAR_BACKEND='bogus'"):
        ops.backend()
    with pytest.raises(ValueError, match="mode='fast'"):
        ops.set_backend_mode("fast")
