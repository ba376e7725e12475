"""Static checks of the notebooks (no execution; nbval and ``make reproduce`` run them).

Every ``notebooks/[0-9]*.ipynb``:

* starts with a code cell tagged ``parameters`` that sets ``PROFILE = "quick"`` (papermill injects
  ``-p PROFILE full`` after it);
* is committed without outputs or execution counts (``python scripts/strip_notebooks.py``), except
  the cells marked ``# NBVAL_CHECK_OUTPUT``: those carry exactly their stdout, which nbval compares
  against a fresh run (``python scripts/strip_notebooks.py --fill-from build/notebooks`` after
  ``make reproduce`` refreshes them);
* defines no functions or classes (library code belongs in ``mustafar``);
* saves figures only under its own stem: ``save_figure(fig, "<stem>_<what>")``, and at least one;
* imports only modules of ``mustafar.analysis`` that exist, and reads superseded measurements
  (``results/archive/``) only by naming them with ``results.archive_path``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mustafar.provenance import repo_root, results_dir

ROOT = repo_root()
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
_SAVE = re.compile(r"save_figure\(\s*[^,]+,\s*(?:f?)[\"']([^\"']+)[\"']")
_DEF = re.compile(r"^\s*(async\s+def|def|class)\s+\w+", re.M)
_FROM_ANALYSIS = re.compile(r"^\s*from\s+mustafar\.analysis(?:\.(\w+))?\s+import\s+([\w ,]+)$", re.M)
_RESULTS_NAME = re.compile(r"\b(results_path|archive_path)\(\s*[\"']([^\"']+)[\"']")


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _src(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/[0-9]*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_is_tagged_parameters_with_quick_profile(path):
    cells = _load(path)["cells"]
    assert cells, f"{path.name} is empty"
    first = cells[0]
    assert first["cell_type"] == "code", f"{path.name}: first cell must be code, is {first['cell_type']}"
    assert "parameters" in first.get("metadata", {}).get("tags", []), f"{path.name}: first cell not tagged 'parameters'"
    assert re.search(r"^PROFILE\s*=\s*[\"']quick[\"']", _src(first), re.M), (
        f"{path.name}: the parameters cell must set PROFILE = \"quick\""
    )
    others = [i for i, c in enumerate(cells[1:], 1) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert not others, f"{path.name}: more than one 'parameters' cell (cells {others})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_outputs_committed_except_checked_stdout(path):
    for i, cell in enumerate(_load(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        outs = cell.get("outputs", [])
        if "# NBVAL_CHECK_OUTPUT" in _src(cell):
            assert isinstance(cell.get("execution_count"), int), (
                f"{path.name} cell {i}: a checked cell needs an execution count, or nbval skips it")
            assert outs, (f"{path.name} cell {i} is marked NBVAL_CHECK_OUTPUT but has no stored output for nbval "
                          "to compare: run scripts/strip_notebooks.py --fill-from <executed notebooks>")
            kinds = {(o.get("output_type"), o.get("name")) for o in outs}
            assert kinds == {("stream", "stdout")}, f"{path.name} cell {i}: checked cells keep stdout only, got {kinds}"
        else:
            assert not outs, f"{path.name} cell {i} has outputs: run scripts/strip_notebooks.py"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_function_definitions(path):
    for i, cell in enumerate(_load(path)["cells"]):
        if cell["cell_type"] == "code":
            m = _DEF.search(_src(cell))
            assert m is None, f"{path.name} cell {i} defines {m.group(0).strip()!r}: move it into mustafar/"
            assert "lambda" not in _src(cell), f"{path.name} cell {i} defines a lambda: move it into mustafar/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_figures_share_the_notebook_stem(path):
    code = "\n".join(_src(c) for c in _load(path)["cells"] if c["cell_type"] == "code")
    names = _SAVE.findall(code)
    assert names, f"{path.name} saves no figure with save_figure(fig, \"{path.stem}_...\")"
    bad = [n for n in names if not n.startswith(path.stem + "_")]
    assert not bad, f"{path.name} saves figures not named {path.stem}_*: {bad}"
    assert len(set(names)) == len(names), f"{path.name} saves the same figure name twice: {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_has_markdown_explaining_the_figures(path):
    cells = _load(path)["cells"]
    assert cells[1]["cell_type"] == "markdown" or any(c["cell_type"] == "markdown" for c in cells[:3]), (
        f"{path.name}: start with a markdown cell saying what the notebook reproduces"
    )
    md = sum(c["cell_type"] == "markdown" for c in cells)
    figs = sum(len(_SAVE.findall(_src(c))) for c in cells if c["cell_type"] == "code")
    assert md >= figs, f"{path.name}: {figs} figures but only {md} markdown cells explaining them"


def test_strip_script_agrees():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "strip_notebooks.py"), "--check", *map(str, NOTEBOOKS)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_imports_existing_analysis_modules(path):
    code = "\n".join(_src(c) for c in _load(path)["cells"] if c["cell_type"] == "code")
    package = ROOT / "mustafar" / "analysis"
    for module, names in _FROM_ANALYSIS.findall(code):
        wanted = [module] if module else [n.strip().split(" as ")[0] for n in names.split(",") if n.strip()]
        missing = [m for m in wanted if not (package / f"{m}.py").is_file()]
        assert not missing, f"{path.name} imports mustafar.analysis modules that do not exist: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_archived_results_are_read_only_as_history(path):
    code = "\n".join(_src(c) for c in _load(path)["cells"] if c["cell_type"] == "code")
    archive = results_dir() / "archive"
    for how, name in _RESULTS_NAME.findall(code):
        file = name if name.endswith(".json") else name + ".json"
        if how == "results_path":
            assert not (archive / file).is_file(), (
                f"{path.name} reads {file} as a current result, but it is archived: use results.archive_path")
        else:
            assert (archive / file).is_file(), f"{path.name} reads {file} from results/archive/, which lacks it"
