"""CPU tests of the e2e generate benchmark's helpers (`python -m mustafar.bench e2e`): the token check
compressed vs simulate, single-step timing with either fill, and the names kept importable from
``mustafar.bench.e2e`` since the grid moved to its own module."""

from __future__ import annotations

import pytest

from mustafar.bench import e2e
from mustafar.bench.common import sdpa_backends


@pytest.fixture(scope="module")
def tiny_llama():
    """Own copy of the tiny model: MustafarCache and the dense caches switch its attention
    implementation ("mustafar" / "sdpa"), so the session's shared fixture is left alone."""
    from mustafar.models import load_model

    return load_model("tiny-llama")


def test_e2e_token_check_and_step_timing_on_cpu(tiny_llama):
    """The GPU end-to-end helpers run on any device: compressed == simulate greedy tokens in fp32
    (tiny random model), the first-difference diagnostics are empty, step timing is positive, and the
    profiler table is produced."""
    model, _ = tiny_llama
    with sdpa_backends():
        chk = e2e.token_check(model, 8, prompt=70, batch=2)
        logged = []
        r = e2e.step_timing(model, "compressed", 0.7, 2, 70, 3, profile_log=logged.append)
    assert chk["leading_tokens_equal"] == [8, 8] and chk["first_difference"] == [None, None]
    assert chk["dtype"] == "float32" and chk["fraction_equal"] == 1.0
    assert r["step_ms_median"] > 0 and len(logged) == 1 and "profile of 3 decode steps" in logged[0]
    assert r["gpu_busy_ms"] is None  # no CUDA kernels on the CPU


def test_step_timing_random_fill(tiny_llama):
    model, _ = tiny_llama
    with sdpa_backends():
        r = e2e.step_timing(model, "compressed", 0.7, 2, 120, 2, fill="random")
        d = e2e.step_timing(model, "dense", 0.0, 2, 120, 2, fill="random")
    assert r["step_ms_median"] > 0 and d["step_ms_median"] > 0
    assert r["gpu_busy_ms"] is None and d["gpu_busy_ms"] is None


def test_kv_fraction():
    from mustafar.format import format_bytes_ratio

    assert e2e.kv_fraction("dense", 0.0, 128) == e2e.kv_fraction("static", 0.0, 128) == 1.0
    assert e2e.kv_fraction("compressed", 0.7, 128) == format_bytes_ratio(128, 0.7) < 1.0


def test_moved_names_still_importable():
    """`from mustafar.bench.e2e import derive` (and the grid's other names) keeps working; each name is
    the one object of its new home."""
    from mustafar.bench import common, e2e_grid, e2e_plan
    from mustafar.bench.e2e import derive, fill_cache, run_grid

    assert derive is e2e_plan.derive and run_grid is e2e_grid.run_grid and fill_cache is common.fill_cache
    with pytest.raises(AttributeError):
        e2e.no_such_name  # noqa: B018
