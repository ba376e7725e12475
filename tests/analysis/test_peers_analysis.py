"""mustafar.analysis.peers: summary over common cells, the table at byte levels, best-at-level, plot."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from mustafar.analysis import peers as ap  # noqa: E402


def _cell(name, family, method, br, scores, task="niah_single", L=1024, qic=False, ratio=0.0, sparsity=0.0, nbits=0):
    p = sum(scores) / len(scores)
    from mustafar.eval.peers import wilson

    lo, hi = wilson(p, len(scores))
    return dict(model="m", task=task, context_length=L, n_samples=len(scores), seed=0, family=family, method=method,
                ratio=ratio, sparsity=sparsity, nbits=nbits, qic=qic, name=f"{name}[{'qic' if qic else 'std'}]",
                variant="qic" if qic else "std", score=100 * p, ci95_lo=100 * lo, ci95_hi=100 * hi, n=len(scores),
                sample_scores=scores, bytes_ratio=br, bytes_ratio_end=br + 0.01)


def _results():
    cells = []
    for task in ("niah_single", "fwe"):
        cells += [_cell("dense", "dense", "", 1.0, [1, 1, 1], task),
                  _cell("MUSTAFAR-KV50", "mustafar", "tok", 0.5625, [1, 1, 1], task, sparsity=0.5),
                  _cell("MUSTAFAR-KV70", "mustafar", "tok", 0.359, [1, 0, 1], task, sparsity=0.7),
                  _cell("SnapKV@cr0.4375", "kvpress", "SnapKV", 0.5621, [1, 0, 0], task, ratio=0.4375),
                  _cell("SnapKV@cr0.6406", "kvpress", "SnapKV", 0.3588, [1, 1, 1], task, ratio=0.6406),
                  _cell("SnapKV@cr0.8000", "kvpress", "SnapKV", 0.1994, [0, 0, 1], task, ratio=0.8),
                  _cell("quanto-4bit", "quant", "quanto", 0.28, [1, 1, 0], task, nbits=4)]
    # a cell only some methods have (a run cut short): left out of the comparison
    cells.append(_cell("dense", "dense", "", 1.0, [0, 0, 0], "niah_multikey"))
    # another profile's cell (2 samples): not in "full"
    cells.append(_cell("dense", "dense", "", 1.0, [0, 0], "niah_single"))
    return dict(profiles={"full": dict(tasks=["niah_single", "niah_multikey", "fwe"], lengths=[1024], samples=3,
                                       qic_lengths=[1024])}, cells=cells)


def test_summary_uses_common_cells_of_the_profile():
    s = ap.peers_summary(_results(), "full", "std")
    assert len(s) == 7 and set(s["n"]) == {6}
    assert s.attrs["dropped_cells"] == [("std", "niah_multikey", 1024)]
    d = s.set_index("label")
    assert d.loc["dense", "avg"] == 100.0 and d.loc["SnapKV@cr0.4375", "avg"] == pytest.approx(100 / 3, abs=0.01)
    assert d.loc["SnapKV@cr0.6406", "group"] == "SnapKV" and d.loc["quanto-4bit", "group"] == "quanto"
    assert 0 <= d.loc["MUSTAFAR-KV70", "ci95_lo"] < d.loc["MUSTAFAR-KV70", "avg"] < d.loc["MUSTAFAR-KV70", "ci95_hi"]


def test_bytes_table_picks_the_closest_point_per_level():
    t = ap.bytes_table(ap.peers_summary(_results(), "full", "std"))
    assert list(t.columns) == ["~0.56", "~0.36", "~0.2"]
    assert t.loc["SnapKV", "~0.36"].startswith("100.0") and t.loc["SnapKV", "~0.36"].endswith("n=6 @0.36")
    assert t.loc["quanto", "~0.56"] == "" and "@0.28" in t.loc["quanto", "~0.36"]
    assert t.loc["MUSTAFAR", "~0.2"] == ""
    assert t.index[0] == "dense"  # ordered by mean score


def test_best_at_levels_ranks_mustafar():
    b = ap.best_at_levels(ap.peers_summary(_results(), "full", "std")).set_index("level")
    assert b.loc[0.5625, "best"] == "MUSTAFAR-KV50" and b.loc[0.5625, "mustafar_rank"] == 1
    assert b.loc[0.36, "best"] == "SnapKV@cr0.6406" and b.loc[0.36, "mustafar_rank"] == 2
    assert b.loc[0.2, "mustafar"] is None or b.loc[0.2, "mustafar"] != b.loc[0.2, "mustafar"]  # None / NaN


def test_plot_peers_pareto_draws_every_group():
    import matplotlib.pyplot as plt

    s = ap.peers_summary(_results(), "full", "std")
    fig, ax = plt.subplots()
    ap.plot_peers_pareto(ax, s, "t")
    labels = set(ax.get_legend_handles_labels()[1])
    assert {"MUSTAFAR", "SnapKV", "quanto", "Pareto front"} <= labels and any(x.startswith("dense") for x in labels)
    plt.close(fig)


def test_committed_peers_results_have_provenance_and_intervals():
    r = ap.peers_results("smollm2-135m")
    assert r["provenance"]["git"] is not None and r["cells"]
    for c in r["cells"]:
        assert c["n"] == len(c["sample_scores"]) and c["ci95_lo"] <= c["score"] <= c["ci95_hi"]


def test_markdown_table():
    t = ap.bytes_table(ap.peers_summary(_results(), "full", "std"))
    md = ap.markdown_table(t).splitlines()
    assert md[0] == "| method | ~0.56 | ~0.36 | ~0.2 |" and md[1] == "|---|---|---|---|"
    assert len(md) == 2 + len(t) and md[2].startswith("| dense | 100.0")
