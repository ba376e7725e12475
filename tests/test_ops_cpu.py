"""Compiled CPU ops (torch.ops.mustafar.*) against the plain-torch reference, and input validation.

Tolerances (sparse_decode, compared with the reference computed in float64 from the same stored
values): float32 atol = rtol = 1e-5; float16 / bfloat16 atol = rtol = 1e-2 (the output is rounded to
the input dtype: 2^-11 / 2^-8 relative). Encode/decode/top-k must match the reference bit for bit.
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
    for name in ("v4", "v5", "v6", "v6g"):
        with pytest.raises(ValueError, match=f"kernel={name} .*CUDA tensors"):
            ops.sparse_decode(*case, kernel=name)
        with pytest.raises(ValueError, match=f"kernel={name} "):
            torch.ops.mustafar.sparse_decode(*case, None, 0.125, name, True)
    with pytest.raises(ValueError, match="kernel=bogus"):
        torch.ops.mustafar.sparse_decode(*case, None, 0.125, "bogus", True)
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
                          (q, kb, kv, vb, vv, kw, vw, torch.tensor([1], dtype=torch.int32), 0.125, "auto", False),
                          test_utils=tests)


@pytest.mark.parametrize("through", ["wrapper", "torch.ops"])
def test_torch_compile_fullgraph_matches_eager(through):
    """The ops trace under torch.compile(fullgraph=True) (fake kernels registered at load) both through the
    validating Python wrappers and as torch.ops.mustafar.*, and give eager's results."""
    torch._dynamo.reset()
    q, kb, kv, vb, vv, kw, vw = _make_case(2, 2, 64, 20, torch.float32, 0.5, 3, seed=41)
    starts = torch.tensor([0, 4], dtype=torch.int32)
    x = torch.randn(2, 2, 5, 64, generator=_gen(42))
    if through == "wrapper":
        def f(q, kb, kv, vb, vv, kw, vw, starts, x):
            xb, xv = ops.prune_encode_topk(x, 20)
            dense = ops.decode_bitmap(xb, xv, 64)
            out = ops.sparse_decode(q, kb, kv, vb, vv, kw, vw, kv_start=starts, scale=0.1, kernel="auto", pdl=True)
            return out * 2, dense + 1
    else:
        def f(q, kb, kv, vb, vv, kw, vw, starts, x):
            xb, xv = torch.ops.mustafar.prune_encode_topk(x, 20)
            dense = torch.ops.mustafar.decode_bitmap(xb, xv, 64)
            out = torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, kw, vw, starts, 0.1, "auto", True)
            return out * 2, dense + 1
    args = (q, kb, kv, vb, vv, kw, vw, starts, x)
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
