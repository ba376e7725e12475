"""CPU tests of ``mustafar.analysis.results`` (the one reader of ``results/``) and of the archive of
superseded measurements (``results/archive/``)."""

from __future__ import annotations

import json
import re

import pytest

from mustafar.analysis import plotting, results
from mustafar.provenance import figures_dir, results_dir

PROV = {"device": "TestGPU", "git": {"commit": "abc1234", "dirty": False}, "date": "2026-01-01"}


@pytest.fixture
def in_tmp_results(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSTAFAR_RESULTS", str(tmp_path))
    return tmp_path


def test_dirs_default_to_the_repository_and_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MUSTAFAR_RESULTS", raising=False)
    monkeypatch.delenv("MUSTAFAR_FIGURES", raising=False)
    assert results.results_dir() == results_dir()
    assert plotting.figures_dir() == figures_dir()
    monkeypatch.setenv("MUSTAFAR_RESULTS", str(tmp_path / "r"))
    monkeypatch.setenv("MUSTAFAR_FIGURES", str(tmp_path / "f"))
    assert results.results_dir() == tmp_path / "r"
    assert plotting.figures_dir() == tmp_path / "f"


def test_paths_take_plain_names_with_or_without_json(in_tmp_results):
    assert results.results_path("kernel_h200") == in_tmp_results / "kernel_h200.json"
    assert results.results_path("kernel_h200.json") == in_tmp_results / "kernel_h200.json"
    assert results.archive_path("e2e_h200") == in_tmp_results / "archive" / "e2e_h200.json"
    for bad in ("", "a/b", None, 3):
        with pytest.raises(ValueError):
            results.results_path(bad)
        with pytest.raises(ValueError):
            results.archive_path(bad)


def test_load_results_layouts(in_tmp_results):
    rows = [{"a": 1, "nested": {"b": 2}}, {"a": 3, "nested": {"b": 4}}]
    (in_tmp_results / "as_list.json").write_text(json.dumps(rows))
    df, meta = results.load_results("as_list")
    assert list(df["a"]) == [1, 3] and meta == {"path": str(in_tmp_results / "as_list.json")}

    (in_tmp_results / "as_dict.json").write_text(json.dumps({"rows": rows, "provenance": PROV, "settings": {"x": 1}}))
    df, meta = results.load_results("as_dict.json")
    assert list(df["nested.b"]) == [2, 4]  # nested row keys flattened
    assert meta["device"] == "TestGPU" and meta["settings"] == {"x": 1} and "rows" not in meta
    assert results.meta_brief(meta) == {"device": "TestGPU", "commit": "abc1234", "date": "2026-01-01"}

    (in_tmp_results / "other_key.json").write_text(json.dumps({"points": rows, "note": "n"}))
    df, meta = results.load_results(in_tmp_results / "other_key.json")  # a path works too
    assert len(df) == 2 and meta["note"] == "n"

    (in_tmp_results / "no_rows.json").write_text(json.dumps({"provenance": PROV}))
    df, meta = results.load_results("no_rows")
    assert df.empty and meta["date"] == "2026-01-01"

    (in_tmp_results / "scalar.json").write_text("3")
    with pytest.raises(ValueError):
        results.load_results("scalar")
    with pytest.raises(FileNotFoundError):
        results.load_results("absent")


def test_read_results_json_wants_an_object(in_tmp_results):
    (in_tmp_results / "a_list.json").write_text("[]")
    with pytest.raises(ValueError):
        results.read_results_json("a_list")
    (in_tmp_results / "obj.json").write_text(json.dumps({"provenance": PROV, "grid": []}))
    raw = results.read_results_json("obj")
    assert results.provenance_brief(raw) == results.meta_brief(PROV)
    assert results.provenance_line(raw) == "device TestGPU, commit abc1234, date 2026-01-01"
    assert results.meta_brief(None) == {"device": None, "commit": None, "date": None}


def test_plain_names_never_reach_the_archive(in_tmp_results):
    (in_tmp_results / "archive").mkdir()
    (in_tmp_results / "archive" / "old.json").write_text(json.dumps({"rows": [{"a": 1}]}))
    with pytest.raises(FileNotFoundError):
        results.load_results("old")
    with pytest.raises(FileNotFoundError):
        results.read_results_json("old")
    df, _ = results.load_results(results.archive_path("old"))
    assert list(df["a"]) == [1]


# ----------------------------------------------------------------------------- the committed archive
ARCHIVE = results_dir() / "archive"


def test_every_archived_file_says_what_replaced_it():
    if not ARCHIVE.is_dir():
        pytest.skip(f"{ARCHIVE} is not in this checkout")
    readme = (ARCHIVE / "README.md").read_text()
    listed = set(re.findall(r"^\| `([^`]+)` \|", readme, re.M))
    files = {p.name for p in ARCHIVE.iterdir() if p.name != "README.md"}
    assert files == listed, f"archive files {sorted(files)} vs README rows {sorted(listed)}"
    for row in re.findall(r"^\| `[^`]+` \|.*$", readme, re.M):
        replaced_by = row.rstrip(" |").rsplit(" | ", 1)[-1]
        for name in re.findall(r"`\.\./([^`]+)`", replaced_by):
            assert (results_dir() / name).is_file(), f"{name}, named as a replacement, is not in results/"
    current = {p.name for p in results_dir().iterdir() if p.is_file()}
    assert not files & current, f"archived and current at once: {sorted(files & current)}"
