"""`python -m mustafar.bench cpu` runs end to end on tiny shapes and writes a complete JSON; the CLI
dispatcher's usage and errors; the GPU-only commands refuse to run without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

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
    assert res["provenance"]["command"].startswith("python -m mustafar.bench cpu --quick")


def test_bench_dispatcher_usage_and_unknown(capsys):
    assert bench_main.main([]) == 2
    assert bench_main.main(["--help"]) == 0
    assert bench_main.main(["nope"]) == 2
    out = capsys.readouterr().out
    assert "cpu" in out
    for name in ("kernel", "overhead", "e2e", "e2e-grid", "generate"):
        assert name in out


def test_bench_cpu_rejects_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="float64"):
        cpu.main(["--quick", "--dtypes", "float64", "--out", str(tmp_path / "x.json")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
@pytest.mark.parametrize("argv", [["kernel", "--quick"], ["overhead"], ["e2e", "--gen", "0"]])
def test_gpu_commands_need_cuda(argv, tmp_path, capsys):
    assert bench_main.main([*argv, "--out", str(tmp_path / "x.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
