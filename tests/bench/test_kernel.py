"""CPU tests of the GPU kernel benchmarks' pure parts (`python -m mustafar.bench kernel`, `overhead`):
which kernels cover a configuration, and the fixed-cost line fit."""

from __future__ import annotations

import pytest

from mustafar.bench import kernel, overhead


def test_kernels_for():
    """v6 / v6g cover 1 or 4 query heads per KV head with k <= 64; v4 and v5 cover everything; every
    name is one the op accepts as ``kernel=``."""
    assert kernel.kernels_for(1, 38) == kernel.kernels_for(4, 64) == ("v4", "v5", "v6", "v6g")
    assert kernel.kernels_for(4, 65) == kernel.kernels_for(2, 38) == kernel.kernels_for(8, 19) == ("v4", "v5")
    assert set(kernel.KERNELS) == {"v4", "v5", "v6", "v6g"}


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
