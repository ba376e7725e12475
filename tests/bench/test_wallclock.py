"""``mustafar.bench wallclock``: the largest batch per cache kind under a KV budget and the best-under-budget summary
(CPU, tiny random model; the GPU numbers come from the device runs in ``results/``)."""

import pytest
import torch

from mustafar.bench.common import GIB, cache_nbytes, make_cache
from mustafar.bench.e2e_plan import kv_geometry, max_batch
from mustafar.bench.wallclock import best_under_budget, budget_groups, run


@pytest.mark.parametrize("kind, s", [("compressed", 0.7), ("compressed", 0.5), ("compressed-fp8", 0.7)])
def test_max_batch_is_the_largest_that_fits(tiny_llama, kind, s):
    """The batch max_batch returns holds at most the budget in a real cache of that batch, one more exceeds it
    (FP8 values included)."""
    model, _ = tiny_llama
    max_len = 300
    one = cache_nbytes(_filled(model, kind, s, max_len, 1))
    budget = 3.5 * one  # fixed bytes (a counter) make 3 fit, not 4 (cache bytes are affine in the batch)
    b = max_batch(kind, s, kv_geometry(model, torch.float32), max_len, budget)
    assert b == 3
    assert cache_nbytes(_filled(model, kind, s, max_len, b)) <= budget < cache_nbytes(_filled(model, kind, s, max_len,
                                                                                               b + 1))


def _filled(model, kind, s, max_len, batch):
    cache = make_cache(kind, model, s, max_len)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, model.config.vocab_size, (batch, 8), generator=g)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


def test_max_batch_dense_and_bad_budget(tiny_llama):
    model, _ = tiny_llama
    geo = kv_geometry(model, torch.float32)
    per_seq = 2 * 2 * 2 * 100 * 64 * 4  # layers x K/V x kv_heads x tokens x head_dim x fp32
    assert max_batch("static", 0.0, geo, 100, 5 * per_seq + 1) == 5
    assert max_batch("static", 0.0, geo, 100, per_seq - 1) == 0
    with pytest.raises(ValueError, match="positive number of bytes, got -1"):
        max_batch("static", 0.0, geo, 100, -1)
    with pytest.raises(ValueError, match="unknown cache kind 'nope'"):
        max_batch("nope", 0.7, geo, 100, 1e9)


def test_budget_groups_split_variants_by_cache_kind(tiny_llama):
    model, _ = tiny_llama
    budget = 64 * 2 * 2 * 2 * 1000 * 64 * 4  # 64 dense sequences of 1000 tokens
    groups = {g: (vs, ss, b) for g, vs, ss, b in budget_groups(
        model, ["static-compiled", "mustafar-compiled", "mustafar-fp8-compiled", "dynamic"], [0.5, 0.7], 1000, budget)}
    assert set(groups) == {"dense", "mustafar@0.5", "mustafar@0.7", "mustafar-fp8@0.5", "mustafar-fp8@0.7"}
    assert groups["dense"] == (["static-compiled", "dynamic"], (), 64)
    assert groups["mustafar@0.7"][:2] == (["mustafar-compiled"], (0.7,))
    # a sparser cache and FP8 values fit more sequences than dense
    assert 64 < groups["mustafar@0.5"][2] < groups["mustafar@0.7"][2] < groups["mustafar-fp8@0.7"][2]


def test_best_under_budget_picks_fitting_cells():
    def cell(batch, dense_kv, rows):
        return {"model": "m", "dtype": "float16", "prompt": 8, "new_tokens": 4, "batch": batch,
                "dense_kv_gib": dense_kv, "variants": rows}

    cells = [
        cell(8, 10.0, {"static-compiled": {"variant": "static-compiled", "decode_tok_per_s": 100.0},
                       "mustafar-compiled@0.7": {"variant": "mustafar-compiled", "decode_tok_per_s": 130.0,
                                                 "cache_gib": 4.0}}),
        cell(16, 20.0, {"static-compiled": {"variant": "static-compiled", "decode_tok_per_s": 150.0}}),
        cell(64, 80.0, {"static-compiled": {"variant": "static-compiled", "decode_tok_per_s": 999.0}}),  # over budget
        cell(40, 50.0, {"mustafar-compiled@0.7": {"variant": "mustafar-compiled", "decode_tok_per_s": 330.0,
                                                  "cache_gib": 19.0}}),
        cell(60, 75.0, {"mustafar-compiled@0.7": {"variant": "mustafar-compiled", "decode_tok_per_s": 900.0,
                                                  "cache_gib": 27.0}}),  # its own cache over budget
    ]
    (e,) = best_under_budget(cells, 20.0)
    assert e["best_static_compiled"] == {"label": "static-compiled", "batch": 16, "decode_tok_per_s": 150.0}
    assert e["mustafar"]["mustafar-compiled@0.7"]["batch"] == 40
    assert e["mustafar"]["mustafar-compiled@0.7"]["vs_best_static_compiled"] == pytest.approx(330.0 / 150.0)


def test_run_budget_batches_cpu(tiny_llama, tmp_path):
    """The budget cells run each cache kind at its own largest batch, only its own variants; the summary is written."""
    model, _ = tiny_llama
    budget_gib = 3 * 2 * 2 * 2 * 1004 * 64 * 4 / GIB  # three dense sequences of 1000 + 4 tokens
    out = tmp_path / "w.json"
    res = run(models=["tiny-llama"], shapes=[(1000, 4)], batches=[1], sparsities=[0.7], variants=["dynamic", "mustafar"],
              reps=1, kv_budget_gib=budget_gib, out=out, budget_batches=True, log=lambda *a: None)
    groups = {c.get("budget_group"): c for c in res["cells"]}
    assert set(groups) == {None, "dense", "mustafar@0.7"}
    assert groups["dense"]["batch"] == 3 and set(groups["dense"]["variants"]) == {"dynamic"}
    assert set(groups["mustafar@0.7"]["variants"]) == {"mustafar@0.7"}
    assert groups["mustafar@0.7"]["batch"] > 3  # 70 % sparse: more sequences under the same budget
    assert groups["mustafar@0.7"]["variants"]["mustafar@0.7"]["cache_gib"] <= budget_gib
    assert out.is_file() and "best_under_budget" in res


def test_prefill_chunk_for():
    from mustafar.bench.wallclock import prefill_chunk_for

    assert prefill_chunk_for(8, 4096, 32768) is None  # fits: one forward
    assert prefill_chunk_for(38, 4096, 32768) == 862
    assert prefill_chunk_for(40000, 16, 32768) == 1
    assert prefill_chunk_for(64, 4096, None) is None


def test_budget_headline_reads_the_summary():
    from mustafar.analysis.wallclock import budget_headline

    cells = [{"model": "m", "dtype": "float16", "prompt": 8, "new_tokens": 4, "batch": b, "dense_kv_gib": kv,
              "variants": rows} for b, kv, rows in [
        (16, 20.0, {"static-compiled": {"variant": "static-compiled", "decode_tok_per_s": 600.0}}),
        (38, 47.5, {"mustafar-compiled@0.7": {"variant": "mustafar-compiled", "decode_tok_per_s": 1300.0,
                                              "cache_gib": 19.9}})]]
    df = budget_headline({"best_under_budget": best_under_budget(cells, 20.0)})
    assert df[["static_batch", "batch"]].values.tolist() == [[16, 38]]
    assert df["decode_ratio"].iloc[0] == pytest.approx(1300.0 / 600.0)
    assert budget_headline({}).empty


def test_run_cell_several_decode_kernels_side_by_side(tiny_llama):
    """--decode-kernel auto v6: each MustafarCache variant once per kernel in the same cell, labelled by suffix (on the
    CPU every kernel name runs the one C++ kernel, so the tokens agree)."""
    from mustafar.bench.wallclock import run_cell

    model, _ = tiny_llama
    cell = run_cell(model, "tiny-llama", 1, 40, 6, [0.7], ["mustafar"], reps=1, kernel=["auto", "v6"],
                    log=lambda *a: None)
    assert set(cell["variants"]) == {"mustafar@0.7", "mustafar@0.7[v6]"}
    assert cell["variants"]["mustafar@0.7[v6]"]["decode_kernel"] == "v6"
    assert cell["decode_kernels"] == ["auto", "v6"]


def test_run_cell_deadline_stops_rounds(tiny_llama):
    """A deadline already past: the cell runs its first round only and records reps=1 of reps_asked=3; without a
    deadline all three rounds run. share() splits the time left equally over the cells left."""
    import time

    from mustafar.bench.wallclock import run_cell, share

    model, _ = tiny_llama
    kw = dict(sparsities=[0.7], variants=["dynamic"], reps=3, log=lambda *a: None)
    cut = run_cell(model, "tiny-llama", 1, 24, 4, deadline=time.perf_counter() - 1.0, **kw)
    assert cut["reps"] == 1 and cut["reps_asked"] == 3
    assert cut["variants"]["dynamic"]["reps"] == 1
    full = run_cell(model, "tiny-llama", 1, 24, 4, **kw)
    assert full["reps"] == 3 and full["variants"]["dynamic"]["reps"] == 3
    assert share(None, 2) is None
    now = time.perf_counter()
    assert share(now + 100.0, 4) - now == pytest.approx(25.0, abs=1.0)
    assert share(now - 5.0, 2) <= time.perf_counter()


def test_run_skips_cells_whose_first_calls_cannot_fit():
    """With --deadline-s, a cell starts only if the previous cell's first calls fit in the time left: with a deadline
    shorter than the first cell took, the second cell is skipped and says why; without one both run."""
    import time

    kw = dict(models=["tiny-llama"], shapes=[(24, 4), (16, 4)], batches=[1], sparsities=[0.7], variants=["dynamic"],
              reps=1, log=lambda *a: None)
    full = run(**kw)
    assert len(full["cells"]) == 2 and full["skipped"] == []
    first = full["cells"][0]["variants"]["dynamic"]["first_call_s"]
    assert first > 0
    t0 = time.perf_counter()
    cut = run(deadline_s=1e-3, **kw)
    assert time.perf_counter() - t0 > 0  # the first cell always runs
    assert len(cut["cells"]) == 1 and cut["cells"][0]["prompt"] == 24
    assert len(cut["skipped"]) == 1 and cut["skipped"][0]["prompt"] == 16
    assert cut["skipped"][0]["why"].startswith("deadline:")
