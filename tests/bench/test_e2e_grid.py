"""CPU tests of the e2e grid (`python -m mustafar.bench e2e-grid`, = `e2e --grid --longest`): the window
cycle, the budget arithmetic, the tokens/s derivation, the GPU-busy reader and a smoke run writing a
JSON with provenance. (The random-K/V cache fill it uses: tests/bench/test_common.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mustafar import MustafarCache, MustafarConfig
from mustafar.bench import e2e, e2e_grid, steps
from mustafar.bench.e2e_plan import (
    derive,
    kv_bytes,
    kv_geometry,
    longest_context,
    max_batch,
    plan_grid,
    tokens_per_s,
)

# hand-checkable geometry: 2 layers, 2 KV heads, head_dim 64, fp32, MustafarConfig's default window
GEO = {"layers": 2, "kv_heads": 2, "head_dim": 64, "itemsize": 4, "local_window": 32, "compress_chunk": 256}
DENSE_PER_TOKEN = 2 * 2 * 2 * 64 * 4  # K and V x layers x heads x D x fp32 = 2048 bytes per token per sequence


@pytest.fixture(scope="module")
def tiny_llama():
    """Own copy of the tiny model: MustafarCache and the dense caches of the grid switch its attention
    implementation ("mustafar" / "sdpa"), so the session's shared fixture is left alone."""
    from mustafar.models import load_model

    return load_model("tiny-llama")


def test_window_cycle_schedule(tiny_llama):
    """The window-cycle measurement compresses exactly one chunk at its second step and leaves the
    cache 8 tokens before the sweep's first context."""
    model, _ = tiny_llama
    geo = kv_geometry(model, torch.float32)
    cache = MustafarCache(model, MustafarConfig(k_sparsity=0.7, v_sparsity=0.7), max_cache_len=400)
    with torch.inference_mode():
        row, nxt, pos = e2e_grid._window_cycle(model, cache, 2, 320, geo, 0, lambda *a: None, "test")
    n0, n1, n2, n3 = row["compressed_tokens_before_after"]
    assert row["schedule_ok"] and n1 == n0 and n2 - n1 == 256 and n3 == n2
    assert pos == 312 == cache.get_seq_length() and nxt.shape == (2, 1)
    assert row["time_source"] == "wall_profiled" and row["compress_ms"] > 0


# --------------------------------------------------------------------------------------------- budget arithmetic
def test_longest_context_dense_by_hand():
    budget = DENSE_PER_TOKEN * 5000  # 5000 tokens' worth of bytes
    assert longest_context("dense", 0.0, GEO, budget) == 4096
    assert longest_context("dense", 0.0, GEO, budget, extra_tokens=904) == 4096  # 4096 + 904 = 5000 fits
    assert longest_context("dense", 0.0, GEO, budget, extra_tokens=905) == 3072
    assert longest_context("dense", 0.0, GEO, budget, batch=2) == 2048
    assert longest_context("dense", 0.0, GEO, budget, multiple=1000) == 5000
    assert longest_context("dense", 0.0, GEO, DENSE_PER_TOKEN * 1000) == 0  # not even 1024 tokens
    assert max_batch("dense", 0.0, GEO, 1000, DENSE_PER_TOKEN * 1000 * 3.5) == 3


def test_longest_context_compressed_by_hand():
    # D=64 -> one 64-bit bitmap word per token vector; 50 %: 32 kept fp32 values each for K and V
    per_token = GEO["layers"] * GEO["kv_heads"] * (2 * 8 + 2 * 32 * 4)  # 1088 bytes
    # the compileable layer (mustafar.cache.static): a dense K/V ring of local_window + compress_chunk + 1 rows,
    # 32 bytes of slack after each of the two value buffers, the int32 [2] lengths and the int64 token count
    window = GEO["layers"] * (GEO["kv_heads"] * 2 * (32 + 256 + 1) * 64 * 4 + 2 * 32 + 8 + 8)
    # store rows = round32(max(1, L - local_window)): token positions that ever leave the window
    assert kv_bytes("compressed", 0.5, GEO, 1, 0) == window + 32 * per_token
    assert kv_bytes("compressed", 0.5, GEO, 1, 3000) == window + 2976 * per_token  # round32(2968)
    budget = window + 3000 * per_token
    assert longest_context("compressed", 0.5, GEO, budget) == 2048  # 3072 needs round32(3040) = 3040 rows
    assert longest_context("compressed", 0.5, GEO, budget + 40 * per_token) == 3072
    assert longest_context("compressed", 0.5, GEO, budget + 39 * per_token) == 2048
    # 70 %: k = 64 - round(44.8) = 19 kept values -> fewer bytes per token -> longer context
    assert longest_context("compressed", 0.7, GEO, 4 * budget) > longest_context("compressed", 0.5, GEO, 4 * budget)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "x"])
def test_longest_context_rejects_nonsense_budget(bad):
    with pytest.raises(ValueError, match="budget"):
        longest_context("dense", 0.0, GEO, bad)
    if not isinstance(bad, str):
        with pytest.raises(ValueError, match="budget"):
            plan_grid(GEO, [("dense", 0.0)], [(100, 100)], [1], bad)


def test_longest_context_rejects_bad_batch():
    with pytest.raises(ValueError, match="batch"):
        longest_context("dense", 0.0, GEO, 1e9, batch=0)
    with pytest.raises(ValueError, match="kind"):
        kv_bytes("sparse", 0.5, GEO, 1, 10)


def test_plan_grid_fit_and_sweeps():
    """Batches that fit at P + G, plus the largest that fits; one sweep per (kind, batch) over the
    union of contexts; static once per P + G; the midpoint added at its batch; window cycles on
    compressed sweeps only."""
    budget = DENSE_PER_TOKEN * 3000 * 2  # dense: B = 2 fits 3000 tokens
    kinds = [("dense", 0.0), ("static", 0.0), ("compressed", 0.7)]
    plan = plan_grid(GEO, kinds, [(1000, 1000), (2000, 1000)], [1, 2, 8], budget, margin=0,
                     midpoint=(1000, 1000, 2))
    sw = {(s["kind"], s["batch"]): s for s in plan["sweeps"] if s["kind"] != "static"}
    assert sw[("dense", 2)]["contexts"] == [1000, 1500, 2000, 3000]
    assert sw[("dense", 3)]["contexts"] == [1000, 2000]  # largest batch at 2000 tokens: 6000 // 2000
    assert ("dense", 8) not in sw
    static = sorted((s["batch"], s["contexts"]) for s in plan["sweeps"] if s["kind"] == "static")
    assert static == [(1, [2000]), (1, [3000]), (2, [2000]), (2, [3000]), (3, [2000])]
    comp = [s for s in plan["sweeps"] if s["kind"] == "compressed"]
    assert max(s["batch"] for s in comp) == max_batch("compressed", 0.7, GEO, 2000, budget)
    assert any(s["cycle"] for s in comp) and not any(s["cycle"] for s in plan["sweeps"] if s["kind"] != "compressed")
    assert plan["sweeps"][0]["kind"] == "dense"  # dense first (sdpa before the model is switched)
    assert {"kind": "dense", "sparsity": 0.0, "batch": 8, "prompt": 1000, "gen": 1000,
            "kv_gib": 8 * 2000 * DENSE_PER_TOKEN / 2**30} in plan["skipped"]


# --------------------------------------------------------------------------------------------- derivation
def test_tokens_per_s_by_hand():
    # mean step (10 + 30) / 2 = 20 ms, + 0.5 ms window, + 128 ms / 256 = 0.5 ms compression = 21 ms
    assert tokens_per_s(8, 1024, 10.0, 30.0, 0.5, 128.0, 256) == pytest.approx(8 / 0.021)
    assert tokens_per_s(8, 1024, 10.0, 30.0) == pytest.approx(400.0)  # 8 / 0.020; t(P+G) alone: 266.7
    assert tokens_per_s(4, 100, 999.0, 20.0, static=True) == pytest.approx(200.0)  # every step t(P+G)
    with pytest.raises(ValueError):
        tokens_per_s(0, 100, 1.0, 1.0)
    with pytest.raises(ValueError):
        tokens_per_s(1, 100, 0.0, 0.0)


def _row(cache, s, b, ctx, ms, gpu=True):
    return {"model": "m", "cache": cache, "sparsity": s, "batch": b, "context": ctx,
            "gpu_busy_ms": ms if gpu else None, "step_ms_median": ms if not gpu else 3 * ms,
            "peak_mem_gib": 5.0, "cache_gib": 4.0, "kv_gib_planned": 3.0}


@pytest.mark.parametrize("gpu", [True, False])
def test_derive_synthetic(gpu):
    rows = [_row("dense", 0.0, 8, 1000, 10.0, gpu), _row("dense", 0.0, 8, 2000, 20.0, gpu),
            _row("dense", 0.0, 8, 1500, 15.5, gpu),
            _row("compressed", 0.7, 8, 1000, 8.0, gpu), _row("compressed", 0.7, 8, 2000, 12.0, gpu),
            _row("compressed", 0.7, 16, 1000, 12.0, gpu), _row("compressed", 0.7, 16, 2000, 20.0, gpu)]
    # window extra 0.5 * (full - empty): 0.5 ms at B=8, 1.0 at B=16; compression 25.6 / 51.2 ms -> 0.1 / 0.2 per token
    cycles = [{"model": "m", "sparsity": 0.7, "batch": 8, "full_ms": 9.0, "empty_ms": 8.0, "compress_ms": 33.6,
               "time_source": "gpu_busy"},
              {"model": "m", "sparsity": 0.7, "batch": 16, "full_ms": 14.0, "empty_ms": 12.0, "compress_ms": 63.2,
               "time_source": "gpu_busy"}]
    out = derive(rows, cycles, [(1000, 1000)], chunk=256, midpoint=(1000, 1000, 8))
    d = {(r["cache"], r["batch"]): r for r in out["derived"]}
    assert set(d) == {("dense", 8), ("compressed", 8), ("compressed", 16)}
    assert d[("dense", 8)]["tok_per_s"] == pytest.approx(8 / 0.015)
    assert d[("compressed", 8)]["step_ms_mean"] == pytest.approx(10.6)
    assert d[("compressed", 8)]["tok_per_s"] == pytest.approx(8 / 0.0106)
    assert d[("compressed", 16)]["tok_per_s"] == pytest.approx(16 / 0.0172)
    assert d[("compressed", 16)]["compress_extra_ms_per_token"] == pytest.approx(0.2)
    assert d[("dense", 8)]["time_source"] == ("gpu_busy" if gpu else "wall_median")
    assert d[("dense", 8)]["peak_mem_gib"] == pytest.approx(5.0 - 4.0 + 3.0)
    best = {r["cache"]: r for r in out["best"]}
    assert best["compressed"]["best_batch"] == 16
    assert best["compressed"]["best_over_best_dense"] == pytest.approx((16 / 0.0172) / (8 / 0.015))
    assert best["compressed"]["at_batch_8_over_dense"] == pytest.approx((8 / 0.0106) / (8 / 0.015))
    (mid,) = out["linearity"]["midpoint"]
    assert mid["context"] == 1500 and mid["rel_error"] == pytest.approx((15.0 - 15.5) / 15.5)
    (fit,) = out["linearity"]["fits"]
    assert fit["cache"] == "dense" and fit["max_rel_residual"] < 0.05


# --------------------------------------------------------------------------------------------- CLI smoke run
def test_grid_smoke_cpu(tmp_path, capsys):
    out = tmp_path / "grid.json"
    argv = ["--grid", "--longest", "--device", "cpu", "--dtype", "float32", "--models", "tiny-llama",
            "--ratios", "320:64", "--grid-batches", "1", "2", "--kv-budget-gib", "0.002", "--steps", "2",
            "--midpoint", "320:64:1", "--out", str(out)]
    assert e2e.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["complete"] is True and "provenance" in res and "--grid" in res["provenance"]["command"]
    assert "B*G / (G*(t(P)+t(P+G))/2)" in res["method"]
    assert res["grid"] and all(r["gpu_busy_ms"] is None and r["step_ms_median"] > 0 for r in res["grid"])
    assert {r["context"] for r in res["grid"]} == {320, 352, 384}
    kinds = {(r["cache"], r["sparsity"]) for r in res["derived"]}
    assert kinds == {("dense", 0.0), ("compressed", 0.5), ("compressed", 0.7)}
    assert all(r["time_source"] == "wall_median" and r["tok_per_s"] > 0 for r in res["derived"])
    assert all(c["schedule_ok"] for c in res["window_cycles"]) and res["window_cycles"]
    assert res["linearity"]["midpoint"] and res["best"]
    for r in res["derived"]:  # every derived configuration fits the budget at P + G
        assert r["kv_gib"] <= 0.002 + 1e-12
    longest = {r["cache"] + str(r["sparsity"]): r for r in res["longest"]}
    assert longest["dense0.0"]["context"] == 1024  # 0.002 GiB / 2048 B = 1048 tokens
    assert all(r["context"] % 1024 == 0 and r["context"] > 0 for r in res["longest"])
    assert longest["compressed0.7"]["context"] > longest["dense0.0"]["context"]
    assert all(math.isfinite(r["tok_per_s"]) for r in res["longest"])
    assert "estimated H200 wall time" in capsys.readouterr().out


def test_grid_cli_rejects_bad_input(capsys):
    assert e2e.main(["--grid", "--device", "cpu", "--kv-budget-gib", "0"]) == 2
    assert e2e.main(["--grid", "--device", "cpu", "--ratios", "2048-1024"]) == 2
    assert e2e.main(["--grid", "--device", "cpu", "--midpoint", "1:2"]) == 2
    assert e2e.main(["--estimate-only", "--models", "llama2-7b", "llama3-8b"]) == 0
    assert "estimated H200 wall time" in capsys.readouterr().out


def test_e2e_grid_subcommand_same_options(capsys):
    """`python -m mustafar.bench e2e-grid` takes the grid's options itself (the same checks)."""
    from mustafar.bench import __main__ as bench_main

    assert bench_main.main(["e2e-grid", "--device", "cpu", "--kv-budget-gib", "0"]) == 2
    assert bench_main.main(["e2e-grid", "--device", "cpu", "--steps", "0"]) == 2
    assert e2e_grid.main(["--device", "cpu", "--ratios", "2048-1024"]) == 2
    capsys.readouterr()
    assert bench_main.main(["e2e-grid", "--estimate-only", "--models", "llama2-7b"]) == 0
    out = capsys.readouterr().out
    assert "estimated H200 wall time" in out and "llama2-7b compressed s=0.7" in out


# --------------------------------------------------------------------------------------------- kernel-time reader
_T0 = [0]


class _FakeEvent:  # a FunctionEvent (prof.events()) and a raw kineto event at once
    def __init__(self, dev, us, name="k", start=None):
        from types import SimpleNamespace

        if start is None:  # back to back after the previous event by default
            start = _T0[0]
        _T0[0] = start + us + 1
        self._dev, self._us, self._name, self._start = dev, us, name, start
        self.device_type = dev
        self.time_range = SimpleNamespace(elapsed_us=lambda: us, start=start, end=start + us)

    def duration_ns(self):
        return self._us * 1000

    def start_ns(self):
        return self._start * 1000

    def name(self):
        return self._name


class _FakeProf:
    def __init__(self, events, kineto_events):
        from types import SimpleNamespace

        self._events = events
        self.n_slow = 0
        kin = [SimpleNamespace(device_type=lambda e=e: e._dev, duration_ns=e.duration_ns, start_ns=e.start_ns,
                               name=e.name) for e in kineto_events]
        self.profiler = SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: kin))

    def events(self):
        self.n_slow += 1
        return self._events


def test_kernel_us_fast_path_cross_checked(monkeypatch):
    """The device-event sum is read from the raw kineto events only after it matched prof.events()
    once; a mismatch switches to prof.events() for good."""
    from torch.autograd import DeviceType

    cuda, cpu = DeviceType.CUDA, DeviceType.CPU
    evs = [_FakeEvent(cuda, 10), _FakeEvent(cuda, 5), _FakeEvent(cpu, 100)]
    monkeypatch.setattr(steps, "_KINETO_FAST", None)
    p = _FakeProf(evs, evs)
    assert steps.kernel_us(p) == 15 and p.n_slow == 1 and steps._KINETO_FAST is True
    p2 = _FakeProf(evs, evs + [_FakeEvent(cuda, 1)])
    assert steps.kernel_us(p2) == 16 and p2.n_slow == 0  # fast path now
    monkeypatch.setattr(steps, "_KINETO_FAST", None)
    p3 = _FakeProf(evs, evs + [_FakeEvent(cuda, 100)])  # disagrees: prof.events() wins, from now on
    assert steps.kernel_us(p3) == 15 and steps._KINETO_FAST is False
    assert steps.kernel_us(_FakeProf(evs, [])) == 15
    monkeypatch.setattr(steps, "_KINETO_FAST", None)
    assert steps.kernel_us(_FakeProf([_FakeEvent(cpu, 3)], [_FakeEvent(cpu, 3)])) == 0  # CPU: undecided
    assert steps._KINETO_FAST is None


def test_kernel_us_counts_overlapping_kernels_once(monkeypatch):
    """GPU-busy time is the union of the device events' intervals: a kernel running alongside another
    (the merge launched as a programmatic dependent of the decode kernel) adds only what sticks out."""
    from torch.autograd import DeviceType

    cuda = DeviceType.CUDA
    evs = [_FakeEvent(cuda, 100, start=1000), _FakeEvent(cuda, 104, start=1000),  # decode + waiting merge
           _FakeEvent(cuda, 10, start=1200), _FakeEvent(cuda, 5, start=1205), _FakeEvent(cuda, 1, start=1300)]
    for fast in (None, False):
        monkeypatch.setattr(steps, "_KINETO_FAST", fast)
        assert steps.kernel_us(_FakeProf(evs, evs)) == 104 + 10 + 1
    assert steps.busy_us([]) == 0.0
    assert steps.busy_us([(5, 7), (0, 2), (1, 3), (7, 8)]) == 6.0
