#!/usr/bin/env python3
"""Strip outputs from notebooks so that git holds their source plus the outputs nbval checks.

Every code cell loses its outputs and execution count, except cells marked ``# NBVAL_CHECK_OUTPUT``:
those keep their ``stdout`` stream outputs (nothing else), which ``pytest --nbval-lax`` compares
against a fresh run, and a fixed execution count (nbval ignores cells whose count is empty). Notebook metadata keeps only the kernelspec and language info; cell metadata
keeps only ``tags``. Files are written only when they change (1-space JSON indent, trailing newline,
the layout nbformat writes).

Usage::

    python scripts/strip_notebooks.py                          # every notebooks/*.ipynb
    python scripts/strip_notebooks.py a.ipynb b.ipynb
    python scripts/strip_notebooks.py --check                  # exit 1 if anything would change
    python scripts/strip_notebooks.py --fill-from build/notebooks
        # take the checked cells' outputs from executed copies (e.g. `make reproduce` output, which
        # ran with PROFILE=quick: the profile nbval runs), matched by cell source, then strip
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEEP_NB_METADATA = ("kernelspec", "language_info")
KEEP_CELL_METADATA = ("tags",)
CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


def _source(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def is_checked(cell: dict) -> bool:
    """Whether nbval compares this cell's output (a code cell marked ``# NBVAL_CHECK_OUTPUT``)."""
    return cell.get("cell_type") == "code" and CHECK_MARK in _source(cell)


def _kept_outputs(outputs: list) -> list:
    """The outputs a checked cell keeps: its stdout streams, merged into one."""
    text = "".join(
        "".join(o["text"]) if isinstance(o.get("text"), list) else o.get("text", "")
        for o in outputs
        if o.get("output_type") == "stream" and o.get("name") == "stdout"
    )
    return [{"name": "stdout", "output_type": "stream", "text": text}] if text else []


def strip(nb: dict) -> dict:
    """Return ``nb`` (a notebook as parsed JSON) without outputs (except checked cells' stdout) and
    without run-specific metadata."""
    if not isinstance(nb, dict) or "cells" not in nb:
        raise ValueError("not a notebook: no 'cells'")
    nb["metadata"] = {k: v for k, v in nb.get("metadata", {}).items() if k in KEEP_NB_METADATA}
    n_code = 0
    for cell in nb["cells"]:
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k in KEEP_CELL_METADATA}
        cell.pop("id", None)
        if cell.get("cell_type") == "code":
            n_code += 1
            cell["outputs"] = _kept_outputs(cell.get("outputs", [])) if is_checked(cell) else []
            # nbval skips (and rejects) a reference cell whose execution_count is None, so a checked
            # cell with a stored output gets a fixed count: its ordinal among the code cells.
            cell["execution_count"] = n_code if cell["outputs"] else None
        else:
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
    nb["nbformat"], nb["nbformat_minor"] = 4, 4  # no cell ids (they would churn)
    return nb


def fill(nb: dict, executed: dict) -> int:
    """Copy the outputs of checked cells from an executed copy (matched by source). Returns how many."""
    by_src = {_source(c): c.get("outputs", []) for c in executed.get("cells", []) if is_checked(c)}
    n = 0
    for cell in nb["cells"]:
        if is_checked(cell) and _source(cell) in by_src:
            cell["outputs"] = _kept_outputs(by_src[_source(cell)])
            n += 1
    return n


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if any notebook is not stripped")
    ap.add_argument("--fill-from", type=Path, default=None,
                    help="folder of executed notebooks (same file names) to take the checked outputs from")
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    paths = args.paths or sorted((root / "notebooks").glob("*.ipynb"))
    dirty = []
    for p in paths:
        text = p.read_text(encoding="utf-8")
        nb = json.loads(text)
        if args.fill_from is not None:
            ex = args.fill_from / p.name
            if not ex.is_file():
                print(f"no executed copy {ex}: checked outputs of {p.name} left as they are", file=sys.stderr)
            else:
                n = fill(nb, json.loads(ex.read_text(encoding="utf-8")))
                print(f"{p.name}: filled {n} checked cell(s) from {ex}")
        new = dumps(strip(nb))
        if new != text:
            dirty.append(p)
            if not args.check:
                p.write_text(new, encoding="utf-8")
    verb = "not stripped" if args.check else "written"
    for p in dirty:
        print(f"{verb}: {p}")
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
