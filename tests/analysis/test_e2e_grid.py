"""CPU tests of the ``mustafar.e2e_grid.e2e_grid`` readers of the recorded e2e grid (``results/e2e_grid_h200.json``,
``results/e2e_grid_static_h200.json``, ``results/e2e_checks_h200.json``) and of notebook 05's cells
that show them.

Two kinds of checks: on synthetic grids (step times chosen by hand, tokens/s through
``mustafar.bench.e2e.derive``) the tables must give the hand-computed numbers; on the committed files
the tables must agree with numbers recomputed here from the files' raw rows (``derived``, ``grid``,
``window_cycles``), so a wrong filter, join or sort in the reshaping shows up as a mismatch.
"""

from __future__ import annotations

import json
import math

import pytest

from mustafar.analysis import e2e_grid, results
from mustafar.bench.e2e import derive
from mustafar.provenance import repo_root, results_dir

ROOT = repo_root()
RESULTS = results_dir()
NOTEBOOK = ROOT / "notebooks" / "05_throughput_and_memory.ipynb"


def _committed(name: str) -> dict:
    p = RESULTS / f"{name}.json"
    if not p.is_file():
        pytest.skip(f"{p} is not in this checkout")
    return json.loads(p.read_text())


# ------------------------------------------------------------------------------------ synthetic grid
def _t(kind: str, b: int, ctx: int) -> float:
    """Hand-made step time (ms): affine in the context, dense steeper than compressed."""
    slope = {"dense": 4e-4, "compressed": 1e-4}[kind]
    return 6.0 + b * ctx * slope


def _synthetic(pairs=((1024, 1024), (2048, 1024)), batches=(1, 8, 16)) -> dict:
    rows = []
    for kind, s in (("dense", 0.0), ("compressed", 0.7)):
        for b in batches:
            for ctx in sorted({c for p, g in pairs for c in (p, p + g)}):
                rows.append({"model": "m", "cache": kind, "sparsity": s, "batch": b, "context": ctx,
                             "gpu_busy_ms": _t(kind, b, ctx), "step_ms_median": 40.0, "kv_gib_planned": 1.0,
                             "cache_gib": 1.0, "peak_mem_gib": 1.5})
    res = derive(rows, [], list(pairs))
    res.update({"settings": {"models": ["m"], "ratios": [f"{p}:{g}" for p, g in pairs], "kv_budget_gib": 40.0},
                "provenance": {"device": "TestGPU", "git": {"commit": "abc1234"}, "date": "2026-01-01"}})
    return res


def _hand_tps(kind: str, b: int, p: int, g: int) -> float:
    return b * 1e3 / (0.5 * (_t(kind, b, p) + _t(kind, b, p + g)))


def test_best_table_synthetic_matches_hand_computation():
    raw = _synthetic()
    best = e2e_grid.e2e_best_table(raw)
    assert best.attrs["baseline"] == "dense"
    assert list(best["P:G"]) == ["1024:1024"] * 2 + ["2048:1024"] * 2  # the settings' pair order
    assert list(best["cache"]) == ["dense DynamicCache", "mustafar 70%"] * 2  # baseline first
    for p, g in ((1024, 1024), (2048, 1024)):
        rows = best[best["P:G"] == f"{p}:{g}"].set_index("cache")
        dense = {b: _hand_tps("dense", b, p, g) for b in (1, 8, 16)}
        comp = {b: _hand_tps("compressed", b, p, g) for b in (1, 8, 16)}
        assert rows.loc["dense DynamicCache", "best_tok_per_s"] == pytest.approx(max(dense.values()))
        assert rows.loc["dense DynamicCache", "best_batch"] == max(dense, key=dense.get)
        assert rows.loc["mustafar 70%", "best_tok_per_s"] == pytest.approx(max(comp.values()))
        assert rows.loc["mustafar 70%", "tok_per_s_at_batch_8"] == pytest.approx(comp[8])
        assert rows.loc["mustafar 70%", "best_over_best_dense"] == pytest.approx(max(comp.values()) / max(dense.values()))
        assert rows.loc["mustafar 70%", "at_batch_8_over_dense"] == pytest.approx(comp[8] / dense[8])
        assert math.isnan(rows.loc["dense DynamicCache", "best_over_best_dense"])


def test_best_table_ratios_equal_the_stored_ones_synthetic():
    raw = _synthetic()
    best = e2e_grid.e2e_best_table(raw)
    for e in raw["best"]:
        if e["cache"] != "compressed":
            continue
        row = best[(best["prompt"] == e["prompt"]) & (best["gen"] == e["gen"]) & (best["cache"] == "mustafar 70%")]
        assert len(row) == 1
        assert row["best_over_best_dense"].iloc[0] == pytest.approx(e["best_over_best_dense"])
        assert row["at_batch_8_over_dense"].iloc[0] == pytest.approx(e["at_batch_8_over_dense"])


def test_targets_verdicts():
    raw = _synthetic(pairs=((4096, 1024),))
    best = e2e_grid.e2e_best_table(raw)
    row = best[best["cache"] == "mustafar 70%"].iloc[0]
    b8, bb = row["at_batch_8_over_dense"], row["best_over_best_dense"]
    t = e2e_grid.e2e_targets(best, model="m", prompt=4096, batch_8_target=b8, best_target=bb)  # exactly at target
    assert list(t["batch_8_met"]) == ["met"] and list(t["best_met"]) == ["met"]
    assert t["baseline"].iloc[0] == "DynamicCache"
    t = e2e_grid.e2e_targets(best, model="m", prompt=4096, batch_8_target=b8 * 1.001, best_target=bb * 1.001)
    assert list(t["batch_8_met"]) == ["not met"] and list(t["best_met"]) == ["not met"]
    assert e2e_grid.e2e_targets(best, model="m", prompt=2048).empty  # no such prompt
    assert e2e_grid.e2e_targets(best, model="other", prompt=4096).empty
    no8 = best.copy()
    no8["at_batch_8_over_dense"] = float("nan")
    assert list(e2e_grid.e2e_targets(no8, model="m", prompt=4096)["batch_8_met"]) == ["n/a"]


def test_tokens_vs_batch_keeps_the_first_file_and_orders_panels():
    a = _synthetic()
    b = _synthetic(pairs=((2048, 1024), (512, 512)))
    for d in b["derived"]:
        d["tok_per_s"] = -1.0  # must lose against file a wherever both have the row
    df = e2e_grid.e2e_tokens_vs_batch(a, None, b)
    assert df.attrs["pairs"] == ["1024:1024", "2048:1024", "512:512"]
    assert df.attrs["models"] == ["m"]
    assert not df.duplicated(["model", "P:G", "cache", "batch"]).any()
    assert (df[df["P:G"] != "512:512"]["tok_per_s"] > 0).all()
    assert set(df[df["P:G"] == "512:512"]["source"]) == {2}
    one = df[(df["P:G"] == "1024:1024") & (df["cache"] == "dense DynamicCache") & (df["batch"] == 8)]
    assert one["tok_per_s"].iloc[0] == pytest.approx(_hand_tps("dense", 8, 1024, 1024))
    assert e2e_grid.e2e_tokens_vs_batch(None).empty


def test_cache_labels():
    assert e2e_grid.e2e_cache_label("dense", 0.0) == "dense DynamicCache"
    assert e2e_grid.e2e_cache_label("static") == "dense StaticCache"
    assert e2e_grid.e2e_cache_label("compressed", 0.5) == "mustafar 50%"
    with pytest.raises(ValueError):
        e2e_grid.e2e_cache_label("compressed")
    with pytest.raises(ValueError):
        e2e_grid.e2e_cache_label("paged", 0.0)


def test_read_results_json_and_provenance(tmp_path):
    with pytest.raises(FileNotFoundError):
        results.read_results_json(tmp_path / "nope.json")
    p = tmp_path / "x.json"
    p.write_text(json.dumps(_synthetic()))
    raw = results.read_results_json(p)
    assert results.provenance_brief(raw) == {"device": "TestGPU", "commit": "abc1234", "date": "2026-01-01"}
    assert results.provenance_line(raw, "x.json") == "x.json: device TestGPU, commit abc1234, date 2026-01-01"
    assert results.provenance_line({}) == "device ?, commit ?, date ?"


def test_longest_and_checks_synthetic():
    raw = {"longest": [
        {"model": "m", "cache": "compressed", "sparsity": 0.7, "context": 3072, "kv_gib": 1.0, "tok_per_s": 5.0},
        {"model": "m", "cache": "dense", "sparsity": 0.0, "context": 1024, "kv_gib": 1.0, "tok_per_s": 4.0,
         "oom_steps_down": [2048]},
    ], "checks": [
        {"model": "m", "dtype": "float16", "new_tokens": 8, "leading_tokens_equal": [3, 8],
         "first_difference": [{"position": 3, "simulate_top1_minus_top2": 0.5, "max_logit_diff_up_to_here": 0.1}, None]},
    ]}
    lt = e2e_grid.e2e_longest_table(raw)
    assert list(lt["cache"]) == ["dense DynamicCache", "mustafar 70%"]
    assert list(lt["context_over_dense"]) == [1.0, 3.0]
    assert list(lt["oom_steps_down"]) == [1, 0]
    ck = e2e_grid.e2e_token_checks(raw)
    assert list(ck["leading_tokens_equal"]) == [3, 8]
    assert ck["first_difference"].iloc[0] == 3 and ck["first_difference"].isna().iloc[1]
    assert ck["margin_within_noise"].iloc[0] is False  # margin 0.5 > noise 0.1: not a rounding flip
    assert ck["margin_within_noise"].iloc[1] is None


# ------------------------------------------------------------------------------------ committed files
def _by_hand_best(raw, model, prompt, gen, cache, sparsity):
    rows = [d for d in raw["derived"] if (d["model"], d["prompt"], d["gen"], d["cache"]) == (model, prompt, gen, cache)
            and abs(d["sparsity"] - sparsity) < 1e-9]
    assert rows, (model, prompt, gen, cache, sparsity)
    top = max(rows, key=lambda d: d["tok_per_s"])
    at8 = next(d["tok_per_s"] for d in rows if d["batch"] == 8)
    return top["tok_per_s"], top["batch"], at8


@pytest.mark.parametrize("model,prompt,gen,s", [("llama2-7b", 4096, 1024, 0.7), ("llama2-7b", 4096, 1024, 0.5),
                                               ("llama3-8b", 1024, 4096, 0.7), ("llama3-8b", 2048, 2048, 0.5)])
def test_best_table_of_the_committed_grid_matches_its_derived_rows(model, prompt, gen, s):
    raw = _committed("e2e_grid_h200")
    best = e2e_grid.e2e_best_table(raw)
    c_best, c_batch, c_8 = _by_hand_best(raw, model, prompt, gen, "compressed", s)
    d_best, _, d_8 = _by_hand_best(raw, model, prompt, gen, "dense", 0.0)
    row = best[(best["model"] == model) & (best["P:G"] == f"{prompt}:{gen}") & (best["cache"] == f"mustafar {s:.0%}")]
    assert len(row) == 1
    row = row.iloc[0]
    assert row["best_tok_per_s"] == pytest.approx(c_best)
    assert row["best_batch"] == c_batch
    assert row["tok_per_s_at_batch_8"] == pytest.approx(c_8)
    assert row["best_over_best_dense"] == pytest.approx(c_best / d_best)
    assert row["at_batch_8_over_dense"] == pytest.approx(c_8 / d_8)
    stored = next(e for e in raw["best"] if (e["model"], e["prompt"], e["gen"], e["cache"]) == (model, prompt, gen, "compressed")
                  and abs(e["sparsity"] - s) < 1e-9)
    assert row["best_over_best_dense"] == pytest.approx(stored["best_over_best_dense"])
    assert row["at_batch_8_over_dense"] == pytest.approx(stored["at_batch_8_over_dense"])


def test_committed_tables_cover_the_grid():
    raw = _committed("e2e_grid_h200")
    best = e2e_grid.e2e_best_table(raw)
    assert len(best) == len(raw["best"])
    assert list(dict.fromkeys(best["P:G"])) == raw["settings"]["ratios"]
    tvb = e2e_grid.e2e_tokens_vs_batch(raw)
    assert len(tvb) == len(raw["derived"])  # one file: nothing dropped
    assert len(tvb.attrs["models"]) * len(tvb.attrs["pairs"]) == 8  # the 2 x 4 panels of the figure


def test_static_comparison_of_the_committed_file():
    raw = _committed("e2e_grid_static_h200")
    best = e2e_grid.e2e_best_table(raw)
    assert best.attrs["baseline"] == "static" and "best_over_best_static" in best.columns
    c_best, _, c_8 = _by_hand_best(raw, "llama2-7b", 4096, 1024, "compressed", 0.7)
    st = [d for d in raw["derived"] if (d["model"], d["prompt"], d["gen"], d["cache"]) == ("llama2-7b", 4096, 1024, "static")]
    s_best = max(d["tok_per_s"] for d in st)
    s_8 = next(d["tok_per_s"] for d in st if d["batch"] == 8)
    t = e2e_grid.e2e_targets(best)
    assert len(t) == 1 and t["baseline"].iloc[0] == "StaticCache"
    assert t["at_batch_8_over_dense"].iloc[0] == pytest.approx(c_8 / s_8)
    assert t["best_over_best_dense"].iloc[0] == pytest.approx(c_best / s_best)
    assert t["batch_8_met"].iloc[0] == ("met" if c_8 / s_8 >= 1.4 else "not met")
    assert t["best_met"].iloc[0] == ("met" if c_best / s_best >= 2.0 else "not met")


def test_linearity_of_the_committed_grid_recomputed_from_grid_rows():
    raw = _committed("e2e_grid_h200")
    lin = e2e_grid.e2e_linearity_table(raw)
    assert len(lin) == len(raw["linearity"]["midpoint"]) > 0
    for _, r in lin.iterrows():
        kind = {"dense DynamicCache": "dense"}.get(r["cache"], "compressed")
        t = {g["context"]: g["gpu_busy_ms"] for g in raw["grid"] if g.get("context") is not None
             and (g["model"], g["cache"], g["batch"]) == (r["model"], kind, r["batch"])
             and (kind == "dense" or r["cache"] == f"mustafar {g['sparsity']:.0%}")}
        interp = 0.5 * (t[r["prompt"]] + t[r["prompt"] + r["gen"]])
        measured = t[r["context"]]
        assert r["measured_ms"] == pytest.approx(measured)
        assert r["rel_error_pct"] == pytest.approx(100 * (interp - measured) / measured)
    fits = e2e_grid.e2e_fit_residuals(raw)
    assert fits["sweeps"].sum() == len(raw["linearity"]["fits"])
    assert fits["max_rel_residual_pct"].max() == pytest.approx(100 * max(f["max_rel_residual"] for f in raw["linearity"]["fits"]))


def test_cycle_table_of_the_committed_grid_equals_the_fitted_points():
    raw = _committed("e2e_grid_h200")
    cyc = e2e_grid.e2e_cycle_table(raw)
    assert cyc["schedule_ok"].all()
    for f in raw["cycle_fit"]:
        sub = cyc[(cyc["model"] == f["model"]) & (cyc["cache"] == f"mustafar {f['sparsity']:.0%}")].set_index("batch")
        for b, w, c in zip(f["batches"], f["window_extra_ms"], f["compress_extra_ms"]):
            assert sub.loc[b, "window_extra_ms"] == pytest.approx(w)
            assert sub.loc[b, "compress_extra_ms_per_token"] * 256 == pytest.approx(c)


def test_longest_and_checks_of_the_committed_files():
    raw = _committed("e2e_grid_h200")
    lt = e2e_grid.e2e_longest_table(raw)
    assert len(lt) == len(raw["longest"])
    for m in set(lt["model"]):
        dense = next(r["context"] for r in raw["longest"] if r["model"] == m and r["cache"] == "dense")
        for _, r in lt[lt["model"] == m].iterrows():
            assert r["context_over_dense"] == pytest.approx(r["context"] / dense)
    assert (lt["kv_gib"] <= lt["budget_gib"]).all()
    checks = _committed("e2e_checks_h200")
    ck = e2e_grid.e2e_token_checks(checks)
    assert len(ck) == sum(len(c["leading_tokens_equal"]) for c in checks["checks"])
    for c in checks["checks"]:
        sub = ck[(ck["model"] == c["model"]) & (ck["dtype"] == c["dtype"])]
        assert list(sub["leading_tokens_equal"]) == c["leading_tokens_equal"]
        for (_, r), fd in zip(sub.iterrows(), c["first_difference"]):
            if fd is None:
                assert r["margin_within_noise"] is None
            else:
                assert r["first_difference"] == fd["position"]
                assert r["margin_within_noise"] == (fd["simulate_top1_minus_top2"] <= fd["max_logit_diff_up_to_here"])


# ------------------------------------------------------------------------------------ notebook cells
def _grid_cells() -> list[str]:
    """Sources of notebook 05's code cells after the e2e-grid markdown heading."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    src = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells]
    start = next(i for i, (c, s) in enumerate(zip(cells, src)) if c["cell_type"] == "markdown"
                 and "prompt:generated pairs" in s)
    return [s for c, s in zip(cells[start:], src[start:]) if c["cell_type"] == "code"]


def _run_cells(monkeypatch, tmp_path, results_dir, capsys) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from mustafar.analysis import plotting

    monkeypatch.setenv("MUSTAFAR_RESULTS", str(results_dir))
    monkeypatch.setenv("MUSTAFAR_FIGURES", str(tmp_path / "figures"))
    ns = {"results": results, "e2e_grid": e2e_grid, "plotting": plotting, "plt": plt, "pd": pd}
    try:
        for src in _grid_cells():
            exec(compile(src, "<notebook 05>", "exec"), ns)  # noqa: S102 - the notebook's own cells
    finally:
        plt.close("all")
    return capsys.readouterr().out


def test_notebook_grid_cells_say_when_the_files_are_absent(monkeypatch, tmp_path, capsys):
    empty = tmp_path / "no_results"
    empty.mkdir()
    out = _run_cells(monkeypatch, tmp_path, empty, capsys)
    for name in ("e2e_grid_h200.json", "e2e_grid_static_h200.json", "e2e_checks_h200.json"):
        assert f"{name} is absent" in out
    assert "met" not in out.replace("not met", "")  # no verdicts without numbers
    assert not (tmp_path / "figures").exists() or not any((tmp_path / "figures").iterdir())


def test_notebook_grid_cells_with_the_committed_files(monkeypatch, tmp_path, capsys):
    for name in ("e2e_grid_h200", "e2e_grid_static_h200", "e2e_checks_h200"):
        _committed(name)
    out = _run_cells(monkeypatch, tmp_path, RESULTS, capsys)
    assert "is absent" not in out
    assert "e2e_grid_h200.json: device NVIDIA H200, commit" in out
    assert "issue targets, Llama-2-7B at prompt 4096" in out
    figs = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figs == sorted(f"05_throughput_and_memory_e2e_grid_{w}.{e}" for w in ("tokens_vs_batch", "longest")
                          for e in ("png", "pdf"))
