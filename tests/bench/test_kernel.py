"""CPU tests of the GPU kernel benchmarks (`python -m mustafar.bench kernel`, `overhead`): the grid, the
byte accounting, the target summary, a CPU smoke run of the same code, and the fixed-cost line fit."""

from __future__ import annotations

import math

import pytest
import torch

from mustafar.bench import kernel, overhead


def test_grid_spans_the_issue_classes():
    """The full grid covers G in {1, 3, 4, 5, 6, 7, 8}, D in {64, 128}, fp16 and bf16, 50-80 %, B from 1 to 128,
    T from 1K to 128K with lengths that are not powers of two; the gqa profile covers the 8-slot class (G = 5-8,
    D = 64 and 128) at every sparsity; a bad profile or kernel name names itself."""
    hs, sps, pts = kernel.grid("full")
    assert {h.group for h in hs} == {1, 3, 4, 5, 6, 7, 8} and {h.d for h in hs} == {64, 128}
    assert {h.dtype for h in hs} == {"float16", "bfloat16"}
    assert set(sps) == {0.5, 0.6, 0.7, 0.8}
    assert min(b for b, _ in pts) == 1 and max(b for b, _ in pts) == 128
    assert min(t for _, t in pts) == 1024 and max(t for _, t in pts) == 131072
    assert any(t & (t - 1) for _, t in pts) and any(b not in (1, 2, 4, 8, 16, 32, 64, 128) for b, _ in pts)
    q_hs, q_sps, q_pts = kernel.grid("quick")
    assert set(q_pts) <= set(pts) and set(q_sps) <= set(sps) and {h.group for h in q_hs} == {1, 3, 4, 7, 8}
    g_hs, g_sps, g_pts = kernel.grid("gqa")
    assert {h.group for h in g_hs} == {5, 6, 7, 8} and {h.d for h in g_hs} == {64, 128} and g_sps == sps
    assert set(g_pts) <= set(pts)
    s_hs, _, s_pts = kernel.grid("short")  # every G at the two target points, names that exist
    assert {h.group for h in s_hs} == {1, 3, 4, 7, 8} and set(s_pts) <= set(pts)
    with pytest.raises(ValueError, match="profile='nope'"):
        kernel.grid("nope")
    with pytest.raises(ValueError, match="v9"):
        kernel.run(heads=hs[:1], points=((1, 64),), kernels=("v6", "v9"), device="cpu", log=lambda m: None)


def test_format_read_bytes_by_hand():
    # B=2, H_q=8, H_kv=2, T=100, D=128, 70 % (k=38), fp16: rows 16 + 76 = 92 B; fp8 rows 16 + 38 + 2 = 56 B
    assert kernel.format_read_bytes(2, 8, 2, 100, 128, 0.7, torch.float16) == 2 * 2 * 2 * 100 * 92 + 2 * 2 * 8 * 128 * 2
    assert kernel.format_read_bytes(2, 8, 2, 100, 128, 0.7, torch.float16, fp8=True) == 2 * 2 * 2 * 100 * 56 + 2 * 2 * 8 * 128 * 2


def _row(**kw):
    base = dict(heads="x", H_q=32, H_kv=32, G=1, D=128, dtype="float16", B=8, T=16384, sparsity=0.7,
                speedup_fused=1.0, fused_bw_frac=0.5, fused_fp8_over_fp8_proxy=1.0, fp8_store_ratio=0.219,
                compress_256_over_step=0.5)
    base.update(kw)
    return base


def test_summary_takes_the_worst_covered_row_and_the_exact_target_rows():
    rows = [_row(speedup_fused=2.1, fused_bw_frac=0.8, fused_fp8_over_fp8_proxy=1.3),
            _row(H_q=28, H_kv=4, G=7, dtype="bfloat16", speedup_fused=0.9),  # the worst covered shape
            _row(B=1, T=1024, speedup_fused=0.2),  # B*T < 16K: outside the coverage target
            _row(sparsity=0.5, speedup_fused=1.5),
            _row(B=1, T=32768, speedup_fused=1.2),
            _row(G=4, H_kv=8, fused_fp8_over_fp8_proxy=1.1)]
    s = {x["target"]: x for x in kernel.summary(rows)}
    cover = s["70 %, every shape with B*T >= 16K: fused >= 1.0x dense"]
    assert cover["got"] == 0.9 and cover["ok"] is False and cover["rows"] == 4
    assert s["MHA D128 fp16 B=8 T=16K 70 %: >= 2.0x dense"]["got"] == 2.1  # the G=7 row is not MHA
    assert s["MHA D128 fp16 B=8 T=16K 70 %: >= 75 % of copy bandwidth"]["got"] == 0.8
    assert s["MHA D128 fp16 B=8 T=16K 50 %: >= 1.4x dense"]["ok"] is True
    assert s["MHA D128 fp16 B=1 T=32K 70 %: >= 1.5x dense"]["ok"] is False
    assert s["sparse + FP8 70 % G=4 B=8 T=16K: >= 1.25x FP8 proxy"]["got"] == 1.1
    assert s["sparse + FP8 70 % D=128: bytes <= 0.22 of fp16 dense"]["ok"] is True
    assert kernel.summary([])[0]["got"] is None and kernel.summary([])[0]["ok"] is None


def test_cpu_smoke_run_matches_the_reference():
    """The benchmark's own code on CPU (op "auto" only): every output within 1e-2 of the float32 reference
    (16-bit and FP8 values), times positive, ratios consistent with the times, bytes as computed."""
    hs = [kernel.Heads("G3", 6, 2, 64, "float16"), kernel.Heads("MHA", 2, 2, 128, "bfloat16")]
    res = kernel.run(heads=hs, sparsities=(0.5, 0.8), points=((2, 300),), device="cpu", log=lambda m: None,
                     progress=False)
    assert len(res["rows"]) == 4 and res["copy_bandwidth_Bps"] > 0
    for r in res["rows"]:
        assert r["rel_err_fused"] < 1e-2 and r["rel_err_fused_fp8"] < 1e-2 and r["rel_err_unfused"] < 1e-2
        assert r["speedup_fused"] == pytest.approx(r["dense_ms"] / r["fused_ms"])
        assert r["fused_fp8_over_fp8_proxy"] == pytest.approx(r["fp8_proxy_ms"] / r["fused_fp8_ms"])
        assert r["k"] == r["D"] - math.floor(r["sparsity"] * r["D"] + 0.5)
        assert r["fused_bytes"] == kernel.format_read_bytes(2, r["H_q"], r["H_kv"], 300, r["D"], r["sparsity"], getattr(torch, r["dtype"]))
        assert r["fused_fp8_bytes"] < r["fused_bytes"] < r["dense_bytes"]
        assert all(r[f"fused_{x}_ms"] is None for x in kernel.KERNELS if f"fused_{x}_ms" in r)
        # T = 300 is not a multiple of 8: the packed (unaligned) layout is timed and checked too
        assert r["rel_err_fused_packed"] < 1e-2 and r["speedup_fused_packed"] == pytest.approx(
            r["dense_ms"] / r["fused_packed_ms"])


def test_cache_layout_pads_rows_to_eight():
    """The benchmark's store layout is the cache's: round_up(T, 8) rows per (b, h), the first T the encoder's rows,
    every (b, h) slice 16-byte aligned; T a multiple of 8 is passed through."""
    x = torch.randn(2, 3, 13, 19).to(torch.float16)
    y = kernel.cache_layout(x)
    assert torch.equal(y, x) and y.stride(1) == 16 * 19 and y.stride(0) == 3 * 16 * 19
    assert all((y[b, h].data_ptr() - y.data_ptr()) % 16 == 0 for b in range(2) for h in range(3))
    z = torch.randn(1, 2, 16, 5)
    assert kernel.cache_layout(z) is z


def test_kernel_bench_has_no_env_switch():
    """The kernel choice is an argument of the op: the benchmarks no longer flip MUSTAFAR_CUDA_* variables."""
    import inspect

    for mod in (kernel, overhead):
        src = inspect.getsource(mod)
        assert "os.environ" not in src and "env_set" not in src


def test_overhead_fit_by_hand():
    # ms = 0.010 + 0.002 * T/1000 exactly: fixed 10 us, 2 us per 1K tokens, no residual
    ts = [2048, 4096, 8192]
    f = overhead.fit(ts, [0.010 + 2e-6 * t for t in ts])
    assert f["fixed_us"] == pytest.approx(10.0) and f["per_1k_tokens_us"] == pytest.approx(2.0)
    assert f["max_residual_us"] == pytest.approx(0.0, abs=1e-9)
    g = overhead.fit(ts, [1.0, 3.0, 2.0])  # not on a line: the least-squares slope of the normal equations
    slope = ((2048 - 4778.67) * (1 - 2) + (4096 - 4778.67) * (3 - 2) + 0) / (
        (2048 - 4778.67) ** 2 + (4096 - 4778.67) ** 2 + (8192 - 4778.67) ** 2)
    assert g["per_1k_tokens_us"] == pytest.approx(slope * 1e6, rel=1e-4)
