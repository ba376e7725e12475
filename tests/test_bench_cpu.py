"""`python -m mustafar.bench cpu` runs end to end on tiny shapes and writes a complete JSON."""

from __future__ import annotations

import json

import pytest

from mustafar.bench import __main__ as bench_main
from mustafar.bench import cpu


def test_bench_cpu_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu, "QUICK_SHAPES", [("tiny", 1, 2, 2, 64, 64)])
    out = tmp_path / "cpu_bench.json"
    assert bench_main.main(["cpu", "--quick", "--reps", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"rows", "settings", "provenance"} <= set(res)
    assert len(res["rows"]) == 2  # float32 x {0.5, 0.7}
    for r in res["rows"]:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and r["encode_ms"] > 0
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
        assert r["max_abs_err"] < 1e-4
        assert r["sparse_kv_bytes"] < r["dense_kv_bytes"]


def test_bench_dispatcher_usage_and_unknown(capsys):
    assert bench_main.main([]) == 2
    assert bench_main.main(["--help"]) == 0
    assert bench_main.main(["nope"]) == 2
    assert "cpu" in capsys.readouterr().out


def test_bench_cpu_rejects_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="float64"):
        cpu.main(["--quick", "--dtypes", "float64", "--out", str(tmp_path / "x.json")])


def test_e2e_token_check_and_step_timing_on_cpu():
    """The GPU end-to-end helpers run on any device: compressed == simulate greedy tokens in fp32
    (tiny random model), the first-difference diagnostics are empty, step timing is positive, and the
    profiler table is produced."""
    from mustafar.bench.e2e import _sdpa_backends, step_timing, token_check
    from mustafar.models import load_model

    model, _ = load_model("tiny-llama")
    with _sdpa_backends():
        chk = token_check(model, 8, prompt=70, batch=2)
        logged = []
        r = step_timing(model, "compressed", 0.7, 2, 70, 3, profile_log=logged.append)
    assert chk["leading_tokens_equal"] == [8, 8] and chk["first_difference"] == [None, None]
    assert chk["dtype"] == "float32" and chk["fraction_equal"] == 1.0
    assert r["step_ms_median"] > 0 and len(logged) == 1 and "profile of 3 decode steps" in logged[0]
    assert r["gpu_busy_ms"] is None  # no CUDA kernels on the CPU
