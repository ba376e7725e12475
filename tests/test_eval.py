"""Tests of mustafar.eval: metrics on hand-made cases, task generators, LongBench loader, sweep plumbing."""
from __future__ import annotations

import json

import pytest
import torch

from mustafar.eval import longbench as lb
from mustafar.eval import metrics as M
from mustafar.eval import ruler
from mustafar.eval.runtime import ByteTokenizer, CacheSpec, build_cache, format_bytes_ratio, greedy_decode, prefill


# ------------------------------------------------------------------------------ metrics
def test_ruler_string_match():
    preds = ["The numbers are 123 and 456.", "nothing here"]
    refs = [["123", "456", "789"], ["abc"]]
    assert M.string_match_all(preds, refs) == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert M.string_match_part(preds, refs) == pytest.approx(50.0)
    assert M.ruler_sample_score("ABC", ["abc"]) == 1.0  # case-insensitive
    with pytest.raises(ValueError):
        M.ruler_sample_score("x", ["x"], mode="some")


def test_normalize_and_qa_f1():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    # pred tokens {cat, sat}, gt tokens {cat, sat, on, mat}: P=1, R=0.5, F1=2/3
    assert M.qa_f1_score("The Cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
    assert M.qa_f1_score("dog", "cat") == 0.0
    assert M.qa_f1_score("Paris", "paris") == 1.0


def test_rouge_l():
    assert M.lcs_length("abcde", "ace") == 3
    # LCS(a b c d, a c d e) = 3 -> P = R = 3/4
    assert M.rouge_l_score("a b c d", "a c d e") == pytest.approx(0.75)
    # P = 2/2, R = 2/4 -> F = 2/3
    assert M.rouge_l_score("x y", "x q y r") == pytest.approx(2 / 3)
    assert M.rouge_l_score("", "a") == 0.0


def test_classification_retrieval_count():
    classes = ["Abbreviation", "Entity", "Description", "Location", "Location city"]
    assert M.classification_score("Location", "Location", all_classes=classes) == 1.0
    # "Location" is a strict substring of the ground truth "Location city": removed; then 1/1
    assert M.classification_score("Location city", "Location city", all_classes=classes) == 1.0
    assert M.classification_score("Entity or Location", "Location", all_classes=classes) == 0.5
    assert M.classification_score("Entity", "Location", all_classes=classes) == 0.0
    assert M.retrieval_score("Paragraph 7", "Paragraph 7") == 1.0
    assert M.retrieval_score("Paragraph 7 or 3", "Paragraph 7") == 0.5
    assert M.retrieval_score("none", "Paragraph 7") == 0.0
    assert M.count_score("There are 12 paragraphs, not 13", 12) == 0.5
    assert M.count_score("no digits", 3) == 0.0


def test_code_sim():
    # kitten/sitting: LCS = 4 ("ittn"), ratio = 8/13 (= python-Levenshtein ratio)
    assert M.levenshtein_ratio("kitten", "sitting") == pytest.approx(8 / 13)
    assert M.levenshtein_ratio("", "") == 1.0
    # the first line without `, # or // is scored
    assert M.code_sim_score("```python\n# comment\nx = 1\ny", "x = 1") == 1.0
    assert M.code_sim_score("// c\n", "abc") == 0.0


# ------------------------------------------------------------------------------ RULER generators
@pytest.mark.parametrize("task", ruler.TASKS)
def test_ruler_generators_deterministic_and_answers_present(task):
    tok = ByteTokenizer()
    L = 6000 if task == "cwe" else 1600
    a = ruler.generate_samples(task, tok, L, 2, seed=3)
    b = ruler.generate_samples(task, tok, L, 2, seed=3)
    c = ruler.generate_samples(task, tok, L, 2, seed=4)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.user for s in a] != [s.user for s in c]
    for s in a:
        assert s.n_tokens <= L and s.n_tokens > 0.7 * L
        text = ruler.render_prompt(tok, s.user, s.answer_prefix)
        assert len(tok(text)["input_ids"]) == s.n_tokens
        for ans in s.answers:
            assert ans in s.user, (task, ans)
        assert 0.0 <= s.chance <= 1.0


def test_ruler_frequency_answers_are_most_frequent():
    tok = ByteTokenizer()
    s = ruler.generate_samples("cwe", tok, 6000, 1, seed=0)[0]
    words = [ln.split(". ", 1)[1] for ln in s.user.split("\n") if ". " in ln and ln.split(". ", 1)[0].isdigit()]
    counts = {w: words.count(w) for w in set(words)}
    assert min(counts[a] for a in s.answers) > max(v for w, v in counts.items() if w not in s.answers)


# ------------------------------------------------------------------------------ LongBench
def test_longbench_loader_and_scoring(tmp_path):
    recs = [
        {"input": "Who wrote it?", "context": "Alice wrote the book. " * 5, "answers": ["Alice"],
         "all_classes": None, "length": 30, "dataset": "hotpotqa", "language": "en", "_id": "a"},
        {"input": "Where?", "context": "It happened in Paris. " * 5, "answers": ["Paris", "paris france"],
         "all_classes": None, "length": 30, "dataset": "hotpotqa", "language": "en", "_id": "b"},
    ]
    with open(tmp_path / "hotpotqa.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    data = lb.load_longbench(tmp_path, datasets=["hotpotqa", "trec"])
    assert list(data) == ["hotpotqa"] and len(data["hotpotqa"]) == 2
    assert data["hotpotqa"][1]["answers"] == ["Paris", "paris france"]
    p = lb.build_prompt("hotpotqa", data["hotpotqa"][0])
    assert "Question: Who wrote it?" in p and "Alice wrote the book." in p
    assert lb.score_dataset("hotpotqa", ["Alice", "Paris."], data["hotpotqa"]) == 100.0
    assert lb.score_dataset("hotpotqa", ["Bob", "Paris"], data["hotpotqa"]) == 50.0
    assert lb.truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert set(lb.DATASETS) == set(lb.DATASET2PROMPT) == set(lb.DATASET2MAXLEN) == set(lb.DATASET2METRIC)


def test_longbench_missing_folder_skips(tmp_path, capsys):
    assert lb.load_longbench(tmp_path / "nope") == {}
    out = capsys.readouterr().out
    assert "LongBench data not found" in out and "narrativeqa.jsonl" in out


# ------------------------------------------------------------------------------ runtime + sweep
@pytest.fixture(scope="module")
def tiny():
    from mustafar.models import load_model

    model, _ = load_model("tiny-llama")
    return model, ByteTokenizer()


def test_replayed_prefill_matches_real_prefill(tiny):
    """build_cache replays the dense prefill into a MustafarCache: same tokens as a real prefill."""
    from mustafar.cache import MustafarCache, MustafarConfig

    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (1, 120), generator=g)
    state = prefill(model, ids)
    spec = CacheSpec(k_sparsity=0.7, v_sparsity=0.5)
    cache, mode = build_cache(model, state, spec, 12)
    ours = greedy_decode(model, cache, state, 12)
    ref_cache = MustafarCache(model, MustafarConfig(k_sparsity=0.7, v_sparsity=0.5, mode=mode))
    from mustafar import cache_kwargs

    ref = model.generate(ids, **cache_kwargs(model, ref_cache), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert mode == "compressed"
    assert ours == ref[0, 120:].tolist()


def test_spec_modes_and_bytes():
    assert CacheSpec().mode == "dense"
    assert CacheSpec(k_sparsity=0.7, v_sparsity=0.7).mode == "compressed"
    assert CacheSpec(k_strategy="per_channel_magnitude", k_sparsity=0.7).mode == "simulate"
    assert CacheSpec(k_strategy="think", k_sparsity=0.7).mode == "compressed"
    assert CacheSpec(k_strategy="output_aware", k_sparsity=0.7).mode == "compressed"
    assert CacheSpec(v_strategy="output_aware", v_sparsity=0.7, v_granularity="per_channel").mode == "simulate"
    assert all(s.impl == "mustafar" for s in (CacheSpec(k_sparsity=0.5), CacheSpec(k_strategy="think", k_sparsity=0.5)))
    # D=128 fp16 70%: (16 + 2*38) / 256 = 0.359 (docs/design.md)
    assert format_bytes_ratio(CacheSpec(k_sparsity=0.7, v_sparsity=0.7), 128) == pytest.approx(92 / 256)


@pytest.mark.parametrize("spec, mode", [
    (CacheSpec(k_strategy="think", k_sparsity=0.5), "compressed"),
    (CacheSpec(k_strategy="output_aware", v_strategy="output_aware", k_sparsity=0.7, v_sparsity=0.5), "compressed"),
    (CacheSpec(v_strategy="output_aware", v_sparsity=0.7, v_granularity="per_channel"), "simulate"),
])
def test_query_driven_spec_builds_mustafar_cache(tiny, spec, mode):
    """Query-driven specs run in MustafarCache (right mode, strategy kwargs) fed the captured queries."""
    from mustafar.cache import MustafarCache

    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (1, 80), generator=g)
    with pytest.raises(ValueError, match="needs queries"):
        build_cache(model, prefill(model, ids), spec, 4)
    state = prefill(model, ids, capture_queries=True)
    cache, got = build_cache(model, state, spec, 4)
    assert got == mode == spec.mode
    assert isinstance(cache, MustafarCache)
    cfg = cache.config
    assert cfg.mode == mode and (cfg.k_strategy, cfg.v_strategy) == (
        spec.k_strategy if spec.k_sparsity else "per_token_magnitude",
        spec.v_strategy if spec.v_sparsity else "per_token_magnitude")
    if spec.v_strategy == "output_aware":
        assert cfg.v_strategy_kwargs == {"granularity": spec.v_granularity}
    toks = greedy_decode(model, cache, state, 4)  # every layer got its queries: decoding works
    assert len(toks) == 4


def test_refresh_cells_drops_stale_offline_and_fixes_labels():
    from mustafar.eval.sweep import refresh_cells

    think = dict(CacheSpec(k_strategy="think", k_sparsity=0.7).to_dict(), config="K=think70,V=dense", mode="offline")
    s24 = dict(CacheSpec(k_strategy="semi_structured_2_4", v_strategy="semi_structured_2_4", k_sparsity=0.5,
                         v_sparsity=0.5).to_dict(), config="K=2:450,V=2:450", mode="compressed")
    res = {"cells": [think, s24]}
    dropped = refresh_cells(res)
    assert dropped == [think] and res["cells"] == [s24] and s24["config"] == "K=2:4,V=2:4"


@pytest.mark.slow
def test_sweep_resumable(tiny, tmp_path):
    from mustafar.eval.sweep import run_sweep
    from mustafar.eval.tables import pareto, summarize

    model, tok = tiny
    kw = dict(model="tiny-llama", profile="tiny", out_dir=tmp_path, model_obj=model, tokenizer=tok,
              progress=False, suites=("ruler", "ppl", "longbench"), longbench_dir=tmp_path / "none")
    r1 = run_sweep(**kw)
    n = len(r1["cells"])
    assert n == 3 * (2 + 1)  # 3 specs x (2 ruler tasks + ppl)
    assert r1["last_run"]["new_cells"] == n
    assert (tmp_path / "accuracy_tiny-llama.csv").is_file()
    modes = {c["config"]: c["mode"] for c in r1["cells"]}
    assert set(modes.values()) == {"dense", "compressed"}
    r2 = run_sweep(**kw)
    assert r2["last_run"]["new_cells"] == 0 and len(r2["cells"]) == n
    t = summarize(r2)
    assert "avg" in t.columns and ("dense", "K=dense,V=dense") in t.index
    p = pareto(r2)
    assert p["pareto"].any() and "smallest_keeping" in p.attrs


def test_longbench_runner_plumbing(tiny, tmp_path):
    model, tok = tiny
    recs = [{"input": "Q?", "context": "word " * 200, "answers": ["Paragraph 3"], "all_classes": None,
             "length": 200, "_id": str(i)} for i in range(2)]
    out = lb.run_longbench(model, tok, {"passage_retrieval_en": recs}, [CacheSpec(), CacheSpec(k_sparsity=0.5, v_sparsity=0.5)],
                           max_length=256, max_new_tokens_cap=3, progress=False)
    assert set(out) == {("passage_retrieval_en", "K=dense,V=dense"), ("passage_retrieval_en", "K=tok50,V=tok50")}
    for r in out.values():
        assert len(r["preds"]) == 2 and 0.0 <= r["score"] <= 100.0 and r["max_new_tokens"] == 3


def test_merge_results_unions_shard_profiles(tmp_path):
    """Shards run with --tasks store partial profiles; the merged file lists every task (summarize filters on it)."""
    from mustafar.eval.sweep import load_results, merge_results, save_results

    base = dict(ruler_lengths=[1024], ruler_samples=2, ppl={"prefill_tokens": 1024})
    cell = dict(CacheSpec().to_dict(), model="m", suite="ruler", context_length=1024, n_samples=2, seed=0,
                mode="dense", config="K=dense,V=dense", score=50.0)
    for name, tasks in (("a", ["t1", "t2"]), ("b", ["t3"])):
        save_results({"provenance": {}, "notes": {}, "profiles": {"quick": dict(base, ruler_tasks=tasks)},
                      "cells": [dict(cell, task=t) for t in tasks]}, tmp_path / f"{name}.json")
    merge_results([tmp_path / "a.json", tmp_path / "b.json"], tmp_path / "m.json")
    m = load_results(tmp_path / "m.json")
    assert m["profiles"]["quick"]["ruler_tasks"] == ["t1", "t2", "t3"] and len(m["cells"]) == 3


def test_shard_tasks_cover_profile_once():
    from mustafar.eval.sweep import PROFILES, shard_tasks

    for prof in ("quick", "full", "tiny"):
        for jobs in (1, 2, 3):
            shards = shard_tasks(prof, jobs)
            flat = [t for sh in shards for t in sh]
            assert sorted(flat) == sorted(PROFILES[prof]["ruler_tasks"]) and len(shards) <= jobs
    assert shard_tasks("full", 2)[0] == ("niah_multivalue", "fwe", "niah_multikey")


def test_run_sharded_launches_shards_and_merges(tmp_path, monkeypatch):
    """--jobs N: one one-thread process per shard (the last also runs ppl/LongBench), then a merge."""
    import subprocess

    from mustafar.eval.sweep import load_results, run_sharded, save_results

    launched = []
    cell = dict(CacheSpec().to_dict(), model="m", suite="ruler", context_length=1024, n_samples=2, seed=0,
                mode="dense", config="K=dense,V=dense", score=50.0)

    class FakePopen:
        def __init__(self, cmd):
            launched.append(cmd)
            tasks = cmd[cmd.index("--tasks") + 1].split(",")
            out = tmp_path / cmd[cmd.index("--out-name") + 1]
            save_results({"provenance": {"command": " ".join(cmd)}, "notes": {},
                          "profiles": {"quick": {"ruler_tasks": tasks, "ruler_lengths": [1024]}},
                          "cells": [dict(cell, task=t) for t in tasks]}, out)

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    merged = run_sharded("m", "quick", 2, out_dir=tmp_path, log=lambda *a: None)
    assert len(launched) == 2 and all(c[c.index("--threads") + 1] == "1" for c in launched)
    assert [c[c.index("--suites") + 1] for c in launched] == ["ruler", "ruler,ppl,longbench"]
    m = load_results(tmp_path / "accuracy_m.json")
    assert len(m["cells"]) == 5 == len(merged["cells"])
    assert m["notes"]["wall_time"]["quick_last_sharded_run"]["shards"] == 2


def test_sweep_cli_shards_by_default(monkeypatch):
    """`python -m mustafar.eval sweep` runs two shards on a >= 2-core machine unless one process is asked for."""
    import mustafar.eval.sweep as sw
    from mustafar.eval import __main__ as cli

    calls = []
    monkeypatch.setattr(sw, "run_sharded", lambda *a, **k: calls.append((a, k)) or {"cells": [], "profiles": {}})
    monkeypatch.setattr(sw, "run_sweep", lambda *a, **k: calls.append(("single", k)) or {"cells": [], "profiles": {}})
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cli.main(["sweep", "--profile", "full", "--samples", "2"])
    assert calls[-1] == (("smollm2-135m", "full", 2), {"out_dir": "results", "extra_args": ["--samples", "2"]})
    cli.main(["sweep", "--profile", "quick", "--tasks", "niah_single"])
    assert calls[-1][0] == "single"
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    cli.main(["sweep", "--profile", "quick"])
    assert calls[-1][0] == "single"
