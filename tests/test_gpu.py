"""CUDA kernels vs the plain-torch reference (float64), on fresh random inputs.

Every output is poisoned (``MUSTAFAR_CUDA_POISON=1``: filled with NaN / -1 before the kernel runs),
so an element a kernel forgets to write fails the comparison. The extension reads the variable once, at
the first CUDA op of the process: this module sets it when it is imported (collection), before any test
of the session runs an op. Decode kernels are chosen with the op's ``kernel`` argument, the merge's
launch with ``pdl``. Tolerance: ||out - ref|| / ||ref|| <
1e-2 for fp16/bf16 and 1e-4 for fp32 against a float64 reference; encode/decode must be exact.
Skipped without CUDA.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from mustafar.ops import reference

pytestmark = pytest.mark.gpu
os.environ["MUSTAFAR_CUDA_POISON"] = "1"  # read once by the extension, at its first CUDA op

if not torch.cuda.is_available():  # pragma: no cover - CPU machines
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def _ext():
    from mustafar.ops.build import load_extension

    load_extension()
    for n in ("encode_bitmap", "decode_bitmap", "prune_encode_topk", "sparse_decode", "append_decode"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mustafar::{n}", "CUDA"), n


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality that treats NaN == NaN (compares the bit patterns of float tensors)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        na, nb = torch.isnan(a), torch.isnan(b)
        if not torch.equal(na, nb):
            return False
        return torch.equal(torch.where(na, torch.zeros_like(a), a), torch.where(nb, torch.zeros_like(b), b))
    return torch.equal(a, b)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    ref = ref.double()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# encode / decode
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_prune_encode_topk_exact(dtype, d):
    g = torch.Generator(device=DEV).manual_seed(d)
    for k in sorted({0, 1, d // 2, d - round(0.7 * d), d - 1, d}):
        x = torch.randn(3, 5, 37, d, device=DEV, generator=g).to(dtype)
        bm, vals = torch.ops.mustafar.prune_encode_topk(x, k)
        rbm, rvals = reference.prune_encode_topk(x, k)
        assert torch.equal(bm, rbm), (k, "bitmap")
        assert _bits_equal(vals, rvals), (k, "values")
    # ties (few distinct magnitudes, both signs) and NaN / inf
    x = (torch.randint(-3, 4, (257, d), device=DEV, generator=g)).to(dtype)
    x[5, 3] = float("nan")
    x[7, 0] = float("inf")
    x[7, 1] = float("-inf")
    for k in (1, d // 3, d - round(0.5 * d), d - 2):
        bm, vals = torch.ops.mustafar.prune_encode_topk(x, k)
        rbm, rvals = reference.prune_encode_topk(x, k)
        assert torch.equal(bm, rbm), (k, "bitmap ties")
        assert _bits_equal(vals, rvals), (k, "values ties")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_encode_decode_bitmap_exact(dtype, d):
    g = torch.Generator(device=DEV).manual_seed(7 + d)
    x = torch.randn(2, 3, 111, d, device=DEV, generator=g).to(dtype)
    mask = torch.rand(x.shape, device=DEV, generator=g) < 0.35
    k = int(mask.sum(-1).max()) + 3  # padded rows
    bm, vals = torch.ops.mustafar.encode_bitmap(x, mask, k)
    rbm, rvals = reference.encode_bitmap(x, mask, k)
    assert torch.equal(bm, rbm)
    assert _bits_equal(vals, rvals)
    dense = torch.ops.mustafar.decode_bitmap(bm, vals, d)
    assert _bits_equal(dense, reference.decode_bitmap(rbm, rvals, d))
    assert _bits_equal(dense, torch.where(mask, x, torch.zeros_like(x)))



# ------------------------------------------------------------------------------------------------
# sparse_decode
# ------------------------------------------------------------------------------------------------
def _make_case(b, h_kv, g, d, t_c, t_w, dtype, s_k=0.7, s_v=0.5, padded=False, strided=False, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    h_q = h_kv * g
    q = torch.randn(b, h_q, d, device=DEV, generator=gen).to(dtype)
    cap = t_c + 13 if strided else t_c

    def comp(s):
        x = torch.randn(b, h_kv, cap, d, device=DEV, generator=gen).to(dtype)
        if padded:  # arbitrary mask: rows with fewer than k stored values
            mask = torch.rand(x.shape, device=DEV, generator=gen) < (1 - s)
            k = max(1, int(mask.sum(-1).max()) if mask.numel() else 1)
            bm, vals = torch.ops.mustafar.encode_bitmap(x, mask, k)
        else:
            k = d - int(math.floor(s * d + 0.5))
            bm, vals = torch.ops.mustafar.prune_encode_topk(x, k)
        return bm[:, :, :t_c], vals[:, :, :t_c]  # strided views of a capacity buffer

    kb, kv = comp(s_k)
    vb, vv = comp(s_v)
    wcap = t_w + 3 if strided else t_w
    kw = torch.randn(b, h_kv, wcap, d, device=DEV, generator=gen).to(dtype)[:, :, :t_w]
    vw = torch.randn(b, h_kv, wcap, d, device=DEV, generator=gen).to(dtype)[:, :, :t_w]
    return q, kb, kv, vb, vv, kw, vw


# every fused decode kernel (the op's kernel argument; fp32 runs v4 only). v6 covers fp16/bf16 with at most
# eight query heads per KV head and k <= 64 stored values per row, v5 fp16/bf16: other cases skip them (and
# they refuse them, test_sparse_decode_v6_refuses / test_sparse_decode_fp16_kernels_refuse_float32).
@pytest.fixture(params=["v7", "v7g", "v6", "v6k", "v5", "v4"])
def decode_kernel(request):
    return request.param


def auto_v6(g):
    """The v6-family kernel "auto" runs for 16-bit values (plan.h): v6k (K on tensor cores through the V tile) for 5-8
    query heads per KV head, v6 otherwise."""
    return "v6k" if 4 < g <= 8 else "v6"


def _skip_unless_v6_covers(kernel, g, dtype, *values):
    if kernel in ("v6", "v6k") and (g > 8 or dtype == torch.float32 or any(v.shape[-1] > 64 for v in values)):
        pytest.skip("v6 covers fp16/bf16, G <= 8, k <= 64")
    if kernel == "v5" and dtype == torch.float32:
        pytest.skip("v5 covers fp16/bf16")
    if kernel in ("v7", "v7g") and dtype == torch.float32:
        pytest.skip("v7 covers fp16/bf16 (float32 runs v4)")


def _ref64(q, kb, kv, vb, vv, kw, vw, ks, scale):
    return reference.sparse_decode(q.double(), kb, kv.double(), vb, vv.double(), kw.double(), vw.double(),
                                   ks, scale)


CASES = [
    # b, h_kv, g, d, t_c, t_w
    (1, 2, 1, 128, 1, 0),
    (1, 2, 1, 128, 0, 1),
    (2, 2, 4, 128, 37, 5),
    (3, 4, 1, 64, 111, 64),
    (2, 2, 4, 64, 1017, 0),
    (1, 3, 4, 128, 1000 + 17, 31),
    (64, 2, 1, 128, 37, 3),
    (2, 8, 4, 128, 4096 + 17, 32),
    (1, 4, 2, 128, 259, 7),
    (2, 2, 3, 64, 70, 9),
    # v6's eight query-head slots (G = 5-8) and G = 2 / 3 in four slots
    (2, 1, 8, 128, 300, 5),
    (1, 2, 7, 128, 517, 17),
    (2, 2, 6, 64, 99, 3),
    (1, 1, 5, 128, 1000, 0),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_sparse_decode_matches_reference(dtype, case, decode_kernel):
    b, h_kv, g, d, t_c, t_w = case
    args = _make_case(b, h_kv, g, d, t_c, t_w, dtype, seed=sum(case))
    _skip_unless_v6_covers(decode_kernel, g, dtype, args[2], args[4])
    scale = 1.0 / math.sqrt(d)
    out = torch.ops.mustafar.sparse_decode(*args, None, scale, variant=decode_kernel)
    ref = _ref64(*args, None, scale)
    assert out.shape == (b, h_kv * g, d) and out.dtype == dtype
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
def test_sparse_decode_masking_padding_strides(dtype, d, decode_kernel):
    b, h_kv, g = 5, 2, 4
    t_c, t_w = 300, 20
    s_v = 0.6 if decode_kernel in ("v6", "v6k") else 0.3
    args = _make_case(b, h_kv, g, d, t_c, t_w, dtype, s_k=0.6, s_v=s_v, padded=True, strided=True, seed=d)
    _skip_unless_v6_covers(decode_kernel, g, dtype, args[2], args[4])
    ks = torch.tensor([0, 17, 299, 310, 320], dtype=torch.int32, device=DEV)  # last: all masked
    scale = 0.7 / math.sqrt(d)
    out = torch.ops.mustafar.sparse_decode(*args, ks, scale, variant=decode_kernel)
    ref = _ref64(*args, ks, scale)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert _rel(out[:4], ref[:4]) < tol
    assert torch.equal(out[4], torch.zeros_like(out[4]))  # every position masked -> zeros


# v5 reads values in three ways depending on k (csrc/cuda/decode_v5.cuh): pairs (k even), 16-byte groups
# (k % 8 == 0) and single values (any k); each with 1, 2 and 4 query heads per KV head
V5_MODES = [
    # d, s_k, s_v, padded            k_k / k_v -> mode
    (128, 0.7, 0.7, False),  # 38 / 38   pair, k/2 odd (conflict-free)
    (128, 0.5, 0.5, False),  # 64 / 64   16-byte groups
    (128, 0.75, 0.5, False),  # 32 / 64  16-byte groups
    (128, 0.8, 0.3, False),  # 26 / 90   pair
    (128, 0.6, 0.6, False),  # 51 / 51   any
    (128, 0.0, 0.0, False),  # 128 / 128 16-byte groups, every channel stored
    (128, 0.995, 0.99, False),  # 1 / 1  any
    (64, 0.7, 0.7, False),  # 19 / 19    any
    (64, 0.5, 0.5, False),  # 32 / 32    16-byte groups
    (128, 0.7, 0.5, True),  # arbitrary masks (rows with fewer than k values)
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", V5_MODES)
@pytest.mark.parametrize("g", [1, 2, 4])
def test_sparse_decode_v5_value_modes(dtype, mode, g):
    d, s_k, s_v, padded = mode
    b, h_kv, t_c, t_w = 3, 2, 64 * 5 + 23, 41
    args = _make_case(b, h_kv, g, d, t_c, t_w, dtype, s_k=s_k, s_v=s_v, padded=padded,
                      seed=int(1000 * s_k) + d + g)
    ks = torch.tensor([0, 5, 100], dtype=torch.int32, device=DEV)
    scale = 1.0 / math.sqrt(d)
    out = torch.ops.mustafar.sparse_decode(*args, ks, scale, variant="v5")
    ref = _ref64(*args, ks, scale)
    assert _rel(out, ref) < 1e-2


# v6 (csrc/cuda/decode_v6.cuh) reads a lane's row in one of three ways picked from k (32-bit pairs when k/2 is odd,
# 16-byte chunks when k % 8 == 0 with an odd or power-of-two chunk count, 16-bit values otherwise) and
# takes a general path for tiles with rows that are not complete top-k rows without an empty 32-bit word
V6_MODES = [
    # d, k_k, k_v, irregular
    (128, 38, 38, None),  # pair / pair (70 %)
    (128, 64, 64, None),  # 16-byte chunks, 8 per row: swizzled (50 %)
    (128, 38, 64, None),  # pair / swizzled
    (128, 40, 24, None),  # 16-byte chunks, 5 and 3 per row: contiguous
    (128, 16, 32, None),  # swizzled, 2 and 4 chunks per row
    (128, 51, 36, None),  # 16-bit / 16-bit (k odd; k % 8 == 4)
    (128, 48, 26, None),  # 16-bit (6 chunks) / pair
    (128, 4, 5, None),  # fewest values a complete row can have (one per 32-bit word)
    (128, 3, 64, None),  # k_k < 4: every tile on the general path
    (64, 19, 19, None),  # 16-bit (70 %, SmolLM2's head_dim)
    (64, 32, 32, None),  # swizzled (50 %)
    (64, 64, 2, None),  # every channel stored / fewest values
    (128, 38, 38, "masks"),  # arbitrary masks: rows with fewer than k values
    (128, 38, 38, "empty_word"),  # complete rows but some with an empty 32-bit word
    (128, 38, 38, "heavy_end_word"),  # an end word with more than half of a row's values: four-word walks
    (64, 19, 32, "unaligned"),  # values not 16-byte aligned: element staging
]


def _v6_case(d, k_k, k_v, irregular, dtype, seed, g=1):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    b, h, t_c, t_w = 3, 2, 32 * 7 + 13, 37
    q = torch.randn(b, h * g, d, device=DEV, generator=gen).to(dtype)

    def comp(k):
        x = torch.randn(b, h, t_c + 1, d, device=DEV, generator=gen).to(dtype)
        if irregular == "masks":
            mask = torch.rand(x.shape, device=DEV, generator=gen) < 0.75 * k / d  # max row count stays <= 64
            kk = max(int(mask.sum(-1).max()), 1)
            bm, vals = torch.ops.mustafar.encode_bitmap(x, mask, kk)
        else:
            if irregular == "empty_word":  # channels 32..63 tiny in every 5th row: never among the top k
                x[:, :, ::5, 32:64] *= 1e-3
            if irregular == "heavy_end_word":  # 24 of the 38 kept values in word 0 (or word 3) of some rows
                x[:, :, ::7, 0:24] *= 10.0
                x[:, :, 3::7, 104:128] *= 10.0
            bm, vals = torch.ops.mustafar.prune_encode_topk(x, k)
        if irregular == "unaligned":  # rows 1.. of a [.., T+1, k] buffer: value base 2k bytes off
            return bm[:, :, 1:], vals[:, :, 1:]
        return bm[:, :, :t_c], vals[:, :, :t_c]

    kb, kv = comp(k_k)
    vb, vv = comp(k_v)
    kw = torch.randn(b, h, t_w, d, device=DEV, generator=gen).to(dtype)
    vw = torch.randn(b, h, t_w, d, device=DEV, generator=gen).to(dtype)
    return q, kb, kv, vb, vv, kw, vw


# "v6" runs the instantiations with k compiled in where they exist (k_k = k_v = 38 or 64 at D = 128),
# "v6g" the run-time-k one everywhere: both are checked on those rows
@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("kernel", ["v6", "v6g", "v6k"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", V6_MODES)
def test_sparse_decode_v6_value_modes(dtype, mode, kernel, g):
    d, k_k, k_v, _ = mode
    if kernel == "v6g" and not (d == 128 and k_k == k_v and k_k in (38, 64)):
        pytest.skip("v6 and v6g run the same instantiation here")
    d, k_k, k_v, irregular = mode
    args = _v6_case(d, k_k, k_v, irregular, dtype, seed=k_k * 131 + k_v + d + g, g=g)
    if irregular == "empty_word":
        assert bool(((args[1][..., 0] >> 32) & 0xFFFFFFFF == 0).any()), "no row with an empty 32-bit word"
    if irregular == "heavy_end_word":  # rows whose word 0 holds 24 values exist (the walks' short-queue check fails)
        w0 = args[1][..., 0] & 0xFFFFFFFF
        assert bool((sum(((w0 >> i) & 1) for i in range(32)) > k_k // 2).any()), "no row with a heavy end word"
    ks = torch.tensor([0, 7, 100], dtype=torch.int32, device=DEV)
    scale = 1.0 / math.sqrt(d)
    out = torch.ops.mustafar.sparse_decode(*args, ks, scale, variant=kernel)
    ref = _ref64(*args, ks, scale)
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("t_c,t_w,b", [(1, 0, 1), (31, 0, 2), (32, 0, 1), (33, 1, 2), (0, 40, 2),
                                       (4096 + 17, 33, 2), (64 * 1024 + 5, 0, 1), (37, 3, 64)])
@pytest.mark.parametrize("kernel,s,g", [("v6", 0.7, 1), ("v6", 0.5, 1), ("v6g", 0.7, 1), ("v6", 0.7, 4),
                                        ("v6", 0.7, 8), ("v6g", 0.5, 6), ("v6", 0.6, 2), ("v6k", 0.7, 1),
                                        ("v6k", 0.7, 4), ("v6k", 0.7, 8), ("v6k", 0.5, 7), ("v6k", 0.6, 3)])
def test_sparse_decode_v6_lengths(t_c, t_w, b, kernel, s, g):
    """Tile edges (the whole-tile staging of the k-compiled-in kernels vs partial tiles), window only, long
    sequences (many splits at batch 1), batch 64; MHA and 2, 4, 6, 8 query heads per KV head."""
    args = _make_case(b, 2, g, 128, t_c, t_w, torch.float16, s_k=s, s_v=s, seed=t_c + t_w)
    scale = 1.0 / math.sqrt(128)
    out = torch.ops.mustafar.sparse_decode(*args, None, scale, variant=kernel)
    ref = _ref64(*args, None, scale)
    assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("kernel", ["v6", "v6g", "v6k"])
def test_sparse_decode_v6_refuses(kernel):
    from mustafar import ops

    args = _make_case(1, 1, 9, 128, 70, 3, torch.float16)  # G = 9 > 8
    with pytest.raises(ValueError, match=f"kernel={kernel} needs"):
        torch.ops.mustafar.sparse_decode(*args, None, 0.1, variant=kernel)
    args = _make_case(1, 2, 1, 128, 70, 3, torch.float16, s_k=0.3)  # k_k = 90 > 64
    with pytest.raises(ValueError, match=f"kernel={kernel} needs"):
        torch.ops.mustafar.sparse_decode(*args, None, 0.1, variant=kernel)
    with pytest.raises(ValueError, match=f"kernel={kernel} needs"):  # through the wrapper too
        ops.sparse_decode(*args, kernel=kernel)


@pytest.mark.parametrize("kernel", ["v5", "v6", "v6g", "v6k"])
def test_sparse_decode_fp16_kernels_refuse_float32(kernel):
    args = _make_case(1, 2, 1, 128, 70, 3, torch.float32)
    with pytest.raises(ValueError, match=f"kernel={kernel} cannot serve q.dtype=Float"):
        torch.ops.mustafar.sparse_decode(*args, None, 0.1, variant=kernel)
    for name in ("auto", "v4"):  # float32 runs v4
        assert _rel(torch.ops.mustafar.sparse_decode(*args, None, 0.1, variant=name), _ref64(*args, None, 0.1)) < 1e-4


def test_sparse_decode_bad_kernel_choice_raises():
    args = _make_case(1, 2, 1, 128, 70, 3, torch.float16)
    with pytest.raises(ValueError, match="kernel=v9"):
        torch.ops.mustafar.sparse_decode(*args, None, 0.1, variant="v9")
    from mustafar import ops

    with pytest.raises(ValueError, match="kernel='v9'"):
        ops.sparse_decode(*args, kernel="v9")


def test_sparse_decode_public_api_and_window_full():
    """mustafar.ops dispatch + a window holding everything (T_c = 0) + fully compressed."""
    from mustafar import ops

    assert ops.backend(DEV) == "cuda"
    for t_c, t_w in ((0, 200), (512, 0)):
        args = _make_case(4, 8, 4, 128, t_c, t_w, torch.float16, seed=t_c)
        ref = _ref64(*args, None, 1.0 / math.sqrt(128))
        for kernel, pdl in (("auto", True), ("v5", False), ("v4", True)):
            out = ops.sparse_decode(*args, kernel=kernel, pdl=pdl)
            assert _rel(out, ref) < 1e-2


@pytest.mark.parametrize("case", [(1, 4, 1, 128, 40000, 17), (1, 2, 4, 64, 30000, 0), (16, 8, 1, 128, 700, 33)])
def test_sparse_decode_merge_with_and_without_pdl(case, decode_kernel):
    """The merge launched as a programmatic dependent of the decode kernel (default) gives the same bits as
    the merge launched after it (pdl=False), on cases with many partials per head (B=1, long T)
    and with many heads; both match the reference. Repeated calls on fresh inputs reuse the workspace."""
    b, h_kv, g, d, t_c, t_w = case
    scale = 1.0 / math.sqrt(d)
    for rep in range(3):
        args = _make_case(b, h_kv, g, d, t_c, t_w, torch.float16, s_k=0.7, s_v=0.7, seed=rep + sum(case))
        _skip_unless_v6_covers(decode_kernel, g, torch.float16, args[2], args[4])
        a = torch.ops.mustafar.sparse_decode(*args, None, scale, variant=decode_kernel)  # pdl=True (the default)
        c = torch.ops.mustafar.sparse_decode(*args, None, scale, variant=decode_kernel, pdl=False)
        assert torch.equal(a, c)
        assert _rel(a, _ref64(*args, None, scale)) < 1e-2


def test_sparse_decode_deterministic():
    args = _make_case(2, 4, 1, 128, 5000, 16, torch.float16, seed=3)
    a = torch.ops.mustafar.sparse_decode(*args, None, 0.088)
    b = torch.ops.mustafar.sparse_decode(*args, None, 0.088)
    assert torch.equal(a, b)


def test_encode_bitmap_too_many_raises():  # kept last: it runs a subprocess
    """A mask with more than k entries in a row raises (checked in a subprocess: a crash fails, not aborts)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from mustafar.ops.build import load_extension\n"
        "load_extension()\n"
        "x = torch.randn(4, 64, device='cuda')\n"
        "m = torch.ones(4, 64, dtype=torch.bool, device='cuda')\n"
        "try:\n"
        "    torch.ops.mustafar.encode_bitmap(x, m, 10)\n"
        "    print('NO ERROR')\n"
        "except (ValueError, RuntimeError) as e:\n"
        "    print('RAISED', type(e).__name__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RAISED" in res.stdout, res.stdout


def test_sparse_decode_bad_head_dim_raises():
    """A TORCH_CHECK failure in the CUDA op's host code raises (subprocess: a crash fails, not aborts). head_dim 192
    (three bitmap words) is not one of the op's 64 / 128 / 256 (256 was the bad value before v7 served it)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from mustafar.ops.build import load_extension\n"
        "load_extension()\n"
        "q = torch.randn(1, 2, 192, device='cuda', dtype=torch.float16)\n"
        "bm = torch.ones(1, 2, 3, 3, dtype=torch.int64, device='cuda')\n"
        "v = torch.randn(1, 2, 3, 8, device='cuda', dtype=torch.float16)\n"
        "w = torch.randn(1, 2, 0, 192, device='cuda', dtype=torch.float16)\n"
        "try:\n"
        "    torch.ops.mustafar.sparse_decode(q, bm, v, bm, v, w, w, None, 0.1)\n"
        "    print('NO ERROR')\n"
        "except (ValueError, RuntimeError) as e:\n"
        "    print('RAISED', type(e).__name__, e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "RAISED" in res.stdout and "head_dim D=192" in res.stdout, res.stdout


# ------------------------------------------------------------------------------------------------ v7 (issue #15)
# v7 alone serves: every G in 1..8, D = 256, e4m3 stored values (+ float16 scale per token vector) on either
# side, device-side lengths with a ring window. Reference: reference.sparse_decode in float64 over the same
# (dequantized) inputs; tolerance 1e-2 as above.
def _fp8_side(bm, vals):
    q8, sc = reference.quantize_fp8(vals)
    return bm, q8, sc


V7_CASES = [
    # b, h_kv, g, d, t_c, ring, sparsity
    (3, 2, 1, 128, 1111, 33, 0.7), (2, 2, 2, 64, 37, 300, 0.5), (1, 4, 3, 128, 2049, 17, 0.6),
    (2, 1, 5, 128, 517, 64, 0.8), (2, 2, 6, 64, 999, 40, 0.9), (1, 4, 7, 128, 4133, 289, 0.7),
    (2, 2, 8, 128, 64, 1, 0.5), (2, 1, 4, 256, 700, 48, 0.7), (1, 2, 1, 256, 3000, 20, 0.8),
    (4, 3, 1, 64, 0, 12, 0.7), (1, 1, 4, 128, 31, 0, 0.7),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fp8", ["none", "k", "v", "kv"])
@pytest.mark.parametrize("case", V7_CASES)
@pytest.mark.parametrize("kernel", ["v7", "v7g"])
def test_v7_fp8_lengths_ring(dtype, fp8, case, kernel):
    b, h_kv, g, d, t_c, ring, s = case
    gen = torch.Generator(device=DEV).manual_seed(int(1000 * sum(case)) + len(fp8))  # case holds a float
    k = d - int(math.floor(s * d + 0.5))
    q = torch.randn(b, h_kv * g, d, device=DEV, generator=gen).to(dtype)
    kx = torch.randn(b, h_kv, t_c, d, device=DEV, generator=gen).to(dtype)
    vx = torch.randn(b, h_kv, t_c, d, device=DEV, generator=gen).to(dtype)
    kb, kv = torch.ops.mustafar.prune_encode_topk(kx, k)
    vb, vv = torch.ops.mustafar.prune_encode_topk(vx, k)
    ks = vs = None
    if "k" in fp8:
        kb, kv, ks = _fp8_side(kb, kv)
    if "v" in fp8:
        vb, vv, vs = _fp8_side(vb, vv)
    kw = torch.randn(b, h_kv, ring, d, device=DEV, generator=gen).to(dtype)
    vw = torch.randn(b, h_kv, ring, d, device=DEV, generator=gen).to(dtype)
    for lengths in (None, (max(0, t_c - 7), max(0, ring - 1))):
        if lengths is not None and ring == 0:
            continue
        ln = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=DEV)
        kvs = torch.randint(0, max(1, t_c // 2), (b,), device=DEV, generator=gen).to(torch.int32)
        if b > 1:
            kvs[-1] = t_c + ring + 1  # every position masked: zeros
        out = torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, kw, vw, kvs, 1 / math.sqrt(d), ks, vs, ln,
                                               variant=kernel)
        ref = reference.sparse_decode(q.double(), kb, kv if ks is not None else kv.double(), vb,
                                      vv if vs is not None else vv.double(), kw.double(), vw.double(), kvs,
                                      1 / math.sqrt(d), k_scale=ks, v_scale=vs, lengths=ln)
        assert _rel(out, ref) < 1e-2, (lengths, fp8)
        if b > 1:
            assert torch.equal(out[-1], torch.zeros_like(out[-1]))


V6_LENGTH_CASES = [
    # b, h_kv, g, d, capacity t_c, ring, sparsity  (v6: G <= 8, D 64 / 128, k <= 64)
    (3, 2, 1, 128, 4133, 33, 0.7), (2, 2, 4, 128, 1111, 289, 0.5), (1, 4, 1, 64, 2049, 17, 0.7),
    (2, 1, 4, 64, 517, 64, 0.6), (4, 3, 1, 128, 96, 1, 0.8), (1, 8, 4, 128, 8192, 40, 0.7),
    (2, 2, 8, 128, 700, 20, 0.7), (1, 3, 3, 64, 333, 9, 0.6), (2, 1, 7, 128, 1500, 48, 0.5),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", V6_LENGTH_CASES)
@pytest.mark.parametrize("kernel", ["v6", "v6g", "v6k"])
def test_v6_device_lengths_ring(dtype, case, kernel):
    """v6 / v6g with device lengths (the compileable cache's call; launched for the capacities, the tiles shared
    out from the lengths in the kernel): against the float64 reference for lengths from empty to full, the
    window a ring, kv_start masking, one fully masked row."""
    b, h_kv, g, d, t_c, ring, s = case
    gen = torch.Generator(device=DEV).manual_seed(7 * t_c + ring + g)
    k = d - int(math.floor(s * d + 0.5))
    q = torch.randn(b, h_kv * g, d, device=DEV, generator=gen).to(dtype)
    kb, kv = torch.ops.mustafar.prune_encode_topk(torch.randn(b, h_kv, t_c, d, device=DEV, generator=gen).to(dtype), k)
    vb, vv = torch.ops.mustafar.prune_encode_topk(torch.randn(b, h_kv, t_c, d, device=DEV, generator=gen).to(dtype), k)
    kw = torch.randn(b, h_kv, ring, d, device=DEV, generator=gen).to(dtype)
    vw = torch.randn(b, h_kv, ring, d, device=DEV, generator=gen).to(dtype)
    for n_c, n_w in [(t_c, ring), (0, ring), (t_c // 3 + 5, 0), (t_c - 31, max(0, ring - 2)), (1, 1), (0, 0)]:
        ln = torch.tensor([n_c, n_w], dtype=torch.int32, device=DEV)
        kvs = torch.randint(0, max(1, (n_c + n_w) // 2), (b,), device=DEV, generator=gen).to(torch.int32)
        if b > 1:
            kvs[-1] = n_c + n_w + 1  # every position masked: zeros
        out = torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, kw, vw, kvs, 1 / math.sqrt(d), None, None, ln,
                                               variant=kernel)
        ref = reference.sparse_decode(q.double(), kb, kv.double(), vb, vv.double(), kw.double(), vw.double(), kvs,
                                      1 / math.sqrt(d), lengths=ln)
        assert torch.isfinite(out).all(), (n_c, n_w)
        assert _rel(out, ref) < 1e-2, (n_c, n_w)
        if b > 1:
            assert torch.equal(out[-1], torch.zeros_like(out[-1])), (n_c, n_w)
        v7 = torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, kw, vw, kvs, 1 / math.sqrt(d), None, None, ln,
                                              variant="v7")
        assert _rel(out, v7.double()) < 1e-2, (n_c, n_w)  # the same attention as v7
        if kernel == auto_v6(g):  # "auto" with lengths runs this v6 kernel wherever v6 serves (plan.h): the same bits
            auto = torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, kw, vw, kvs, 1 / math.sqrt(d), None, None, ln)
            assert torch.equal(auto, out), (n_c, n_w)


V6_FP8_CASES = [
    # b, h_kv, g, d, capacity t_c, ring, sparsity  (k = 38 and 64 at D = 128 compiled in; others at run time)
    (3, 2, 1, 128, 1111, 33, 0.7), (2, 2, 4, 128, 517, 20, 0.5), (1, 4, 1, 64, 2049, 17, 0.7),
    (2, 1, 8, 128, 700, 9, 0.7), (1, 3, 3, 64, 333, 5, 0.6), (2, 2, 1, 128, 96, 1, 0.8), (1, 2, 7, 128, 4133, 40, 0.6),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", V6_FP8_CASES)
@pytest.mark.parametrize("kernel", ["v6", "v6g"])
def test_v6_fp8_values(dtype, case, kernel):
    """v6 / v6g with e4m3 values on both sides (+ fp16 row scales): against the float64 reference over the
    dequantized values, with and without device lengths (ring window), kv_start masking, a fully masked row,
    partial tiles; and against v7 on the same inputs."""
    b, h_kv, g, d, t_c, ring, s = case
    gen = torch.Generator(device=DEV).manual_seed(11 * t_c + ring + g + d)
    k = d - int(math.floor(s * d + 0.5))
    q = torch.randn(b, h_kv * g, d, device=DEV, generator=gen).to(dtype)
    kb, kv = torch.ops.mustafar.prune_encode_topk(torch.randn(b, h_kv, t_c, d, device=DEV, generator=gen).to(dtype), k)
    vb, vv = torch.ops.mustafar.prune_encode_topk(torch.randn(b, h_kv, t_c, d, device=DEV, generator=gen).to(dtype), k)
    kb, k8, ks = _fp8_side(kb, kv)
    vb, v8, vs = _fp8_side(vb, vv)
    kw = torch.randn(b, h_kv, ring, d, device=DEV, generator=gen).to(dtype)
    vw = torch.randn(b, h_kv, ring, d, device=DEV, generator=gen).to(dtype)
    for lengths in (None, (max(0, t_c - 37), max(0, ring - 1)), (t_c // 2 + 1, ring)):
        ln = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=DEV)
        n = t_c + ring if lengths is None else sum(lengths)
        kvs = torch.randint(0, max(1, n // 2), (b,), device=DEV, generator=gen).to(torch.int32)
        if b > 1:
            kvs[-1] = n + 1  # every position masked: zeros
        out = torch.ops.mustafar.sparse_decode(q, kb, k8, vb, v8, kw, vw, kvs, 1 / math.sqrt(d), ks, vs, ln,
                                               variant=kernel)
        ref = reference.sparse_decode(q.double(), kb, k8, vb, v8, kw.double(), vw.double(), kvs, 1 / math.sqrt(d),
                                      k_scale=ks, v_scale=vs, lengths=ln)
        assert torch.isfinite(out).all(), lengths
        assert _rel(out, ref) < 1e-2, lengths
        if b > 1:
            assert torch.equal(out[-1], torch.zeros_like(out[-1])), lengths
        v7 = torch.ops.mustafar.sparse_decode(q, kb, k8, vb, v8, kw, vw, kvs, 1 / math.sqrt(d), ks, vs, ln,
                                              variant="v7")
        assert _rel(out, v7.double()) < 1e-2, lengths
        if kernel == "v6":  # "auto" runs v6 for e4m3 values on both sides where v6 serves (plan.h): the same bits
            auto = torch.ops.mustafar.sparse_decode(q, kb, k8, vb, v8, kw, vw, kvs, 1 / math.sqrt(d), ks, vs, ln)
            assert torch.equal(auto, out), lengths


def test_v6_fp8_needs_both_sides():
    """v6 takes e4m3 values on both sides or neither: one side raises, naming it."""
    q = torch.randn(1, 2, 128, device=DEV, dtype=torch.float16)
    kb, kv = torch.ops.mustafar.prune_encode_topk(torch.randn(1, 2, 64, 128, device=DEV, dtype=torch.float16), 38)
    kb8, k8, ks = _fp8_side(kb, kv)
    w = torch.randn(1, 2, 8, 128, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="e4m3 K values"):
        torch.ops.mustafar.sparse_decode(q, kb8, k8, kb, kv, w, w, None, 0.1, ks, None, None, variant="v6")
    kb8v, v8, vs = _fp8_side(kb, kv)
    for name in ("v6k",):  # K on tensor cores: 16-bit values only
        with pytest.raises(ValueError, match=f"kernel={name} .*e4m3 K values and e4m3 V values"):
            torch.ops.mustafar.sparse_decode(q, kb8, k8, kb8v, v8, w, w, None, 0.1, ks, vs, None, variant=name)


def test_v6_lengths_refused_where_v6_cannot_serve():
    """Named v6 with lengths outside v6's class (G = 9; k = 90 > 64) raises, naming the value; v5 / v4 refuse
    lengths."""
    q = torch.randn(1, 9, 128, device=DEV, dtype=torch.float16)
    kb, kv = torch.ops.mustafar.prune_encode_topk(torch.randn(1, 1, 64, 128, device=DEV, dtype=torch.float16), 38)
    w = torch.randn(1, 1, 8, 128, device=DEV, dtype=torch.float16)
    ln = torch.tensor([64, 8], dtype=torch.int32, device=DEV)
    with pytest.raises((ValueError, RuntimeError), match="G=9"):
        torch.ops.mustafar.sparse_decode(q, kb, kv, kb, kv, w, w, None, 0.1, None, None, ln, variant="v6")
    kb90, kv90 = torch.ops.mustafar.prune_encode_topk(torch.randn(1, 1, 64, 128, device=DEV, dtype=torch.float16), 90)
    with pytest.raises((ValueError, RuntimeError), match="k_k=90"):
        torch.ops.mustafar.sparse_decode(q[:, :1], kb90, kv90, kb90, kv90, w, w, None, 0.1, None, None, ln,
                                         variant="v6")
    for name in ("v5", "v4"):
        with pytest.raises((ValueError, RuntimeError), match="device lengths"):
            torch.ops.mustafar.sparse_decode(q[:, :1], kb, kv, kb, kv, w, w, None, 0.1, None, None, ln, variant=name)


@pytest.mark.parametrize("dtype,d,s,L,chunk,fp8", [
    (torch.float16, 128, 0.7, 32, 64, False), (torch.bfloat16, 64, 0.5, 8, 16, True),
    (torch.float16, 256, 0.8, 0, 8, False), (torch.bfloat16, 128, 0.6, 16, 1, True), (torch.float32, 64, 0.7, 4, 4, False)])
def test_append_decode_cuda_equals_reference(dtype, d, s, L, chunk, fp8):
    """300 steps of append_decode on the GPU and in the plain-torch reference from the same state: identical
    states after every step (bitmaps, values / e4m3 bytes and scales, ring, lengths)."""
    b, h, steps = 2, 3, 300
    k = d - int(math.floor(s * d + 0.5))
    C, R = ((steps + 31) // 32) * 32, L + chunk + 1
    vdt = torch.float8_e4m3fn if fp8 else dtype
    gen = torch.Generator(device=DEV).manual_seed(d + k)
    state = dict(k_window=torch.zeros(b, h, R, d, dtype=dtype, device=DEV),
                 v_window=torch.zeros(b, h, R, d, dtype=dtype, device=DEV),
                 k_bitmap=torch.zeros(b, h, C, d // 64, dtype=torch.int64, device=DEV),
                 k_values=torch.zeros(b, h, C, k, dtype=vdt, device=DEV),
                 v_bitmap=torch.zeros(b, h, C, d // 64, dtype=torch.int64, device=DEV),
                 v_values=torch.zeros(b, h, C, k, dtype=vdt, device=DEV),
                 k_scale=torch.ones(b, h, C, dtype=torch.float16, device=DEV) if fp8 else None,
                 v_scale=torch.ones(b, h, C, dtype=torch.float16, device=DEV) if fp8 else None,
                 lengths=torch.zeros(2, dtype=torch.int32, device=DEV))
    ref = {n: (None if t is None else t.clone()) for n, t in state.items()}
    names = ("k_window", "v_window", "k_bitmap", "k_values", "v_bitmap", "v_values", "k_scale", "v_scale", "lengths")
    for step in range(steps):
        kn = torch.randn(b, h, 1, d, device=DEV, generator=gen).to(dtype)
        vn = torch.randn(b, h, 1, d, device=DEV, generator=gen).to(dtype)
        if step % 17 == 3:
            kn[..., : d // 2] = 0.5  # ties: the tie rule decides
        torch.ops.mustafar.append_decode(kn, vn, *[state[n] for n in names], L, chunk)
        reference.append_decode(kn, vn, *[ref[n] for n in names], L, chunk)
    for n in names:
        if state[n] is None:
            continue
        a, r = state[n], ref[n]
        if a.dtype == torch.float8_e4m3fn:
            a, r = a.view(torch.uint8), r.view(torch.uint8)
        assert torch.equal(a, r), n


@pytest.mark.parametrize("vdt,kernel", [("model", "auto"), ("fp8_e4m3", "auto"), ("model", "v6")])
def test_compiled_cuda_graph_generation_matches_eager(vdt, kernel, monkeypatch):
    """MustafarCache(max_cache_len) on the GPU, fp16 tiny-llama (the CUDA static layer is 16-bit), 96 tokens, left
    padding: the decode step compiled with mode="reduce-overhead" replays a CUDA graph (inductor skipped none) and,
    fed the eager run's tokens (teacher forcing, so one flipped near-tie does not change every later input), picks
    the eager next token at >= 95 % of the steps and the same first token. Exact equality is the CPU test's
    (float32, tests/test_generate.py); in fp16 inductor's fused kernels round differently from eager.
    kernel="v6": v6 with device lengths on an MHA variant of tiny-llama (what "auto" runs for MHA)."""
    import mustafar
    import mustafar.generate as mg
    from torch._dynamo.utils import counters

    if kernel == "v6":
        from transformers import LlamaConfig, LlamaForCausalLM

        from mustafar.models import PRESETS

        torch.manual_seed(0)
        tiny = PRESETS["tiny-llama"]["config"]
        conf = dict(tiny, num_key_value_heads=tiny["num_attention_heads"])  # MHA: G = 1
        model = LlamaForCausalLM(LlamaConfig(**conf)).to(device=DEV, dtype=torch.float16).eval()
    else:
        model = mustafar.load_model("tiny-llama", dtype=torch.float16)[0].to(DEV).eval()
    cfg = mustafar.MustafarConfig(k_sparsity=0.7, v_sparsity=0.7, local_window=8, compress_chunk=16,
                                  k_value_dtype=vdt, v_value_dtype=vdt, decode_kernel=kernel)
    ids = torch.randint(3, 1000, (3, 40), device=DEV)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    n, p = 96, ids.shape[1]
    eager = mg.generate(model, ids, mustafar.MustafarCache(model, cfg, max_cache_len=p + n), n, attention_mask=mask)
    forced = eager[:, p:]  # [B, n]: the input of decode step i is forced[:, i]
    compiled = mg._compiled_step("reduce-overhead", "inductor", True)
    outs = []

    def teacher_forced(model_, token, cache_, position, mask_):
        i = len(outs)
        out = compiled(model_, forced[:, i:i + 1].clone(), cache_, position, mask_)
        outs.append(out.clone())
        return out

    monkeypatch.setattr(mg, "_compiled_step", lambda *a: teacher_forced)
    skips = counters["inductor"]["cudagraph_skips"]
    seq = mg.generate(model, ids, mustafar.MustafarCache(model, cfg, max_cache_len=p + n), n, attention_mask=mask,
                      compile="reduce-overhead")
    assert counters["inductor"]["cudagraph_skips"] == skips  # no fallback ("mutated inputs" when not static)
    assert torch.equal(seq[:, p], eager[:, p])  # the prefill's token
    pred = torch.cat(outs, dim=1)  # [B, n - 1]: predictions of forced[:, 1:]
    agree = float((pred == forced[:, 1:]).float().mean())
    assert agree >= 0.95, agree


def test_static_cache_float32_on_cuda_raises():
    import mustafar
    from mustafar.generate import generate

    model = mustafar.load_model("tiny-llama")[0].to(DEV).eval()
    ids = torch.randint(3, 1000, (2, 20), device=DEV)
    cache = mustafar.MustafarCache(model, mustafar.MustafarConfig(local_window=8, compress_chunk=16), max_cache_len=40)
    with pytest.raises(ValueError, match="float16 / bfloat16 model"):
        generate(model, ids, cache, 4)
