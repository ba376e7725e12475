"""Results files: the one place of the analysis that reads ``results/``.

Every measurement file under ``results/`` is JSON (or a CSV twin) with a ``provenance`` block
(:func:`mustafar.provenance.collect`). Here they are found (:func:`results_dir`,
:func:`results_path`, :func:`archive_path`), read (:func:`load_results` for files holding one list
of rows, :func:`read_results_json` for files with several parts) and their provenance summarised
(:func:`provenance_brief`, :func:`meta_brief`, :func:`provenance_line`).

Superseded measurements live in ``results/archive/`` (its ``README.md`` says what replaced each).
A plain name (``"kernel_h200"``) is looked up in ``results/`` only, never in the archive: a
notebook that shows an archived run names it with :func:`archive_path`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = [
    "results_dir",
    "results_path",
    "archive_path",
    "load_results",
    "read_results_json",
    "meta_brief",
    "provenance_brief",
    "provenance_line",
]

#: keys under which a results dict may hold its list of rows, in the order they are tried.
_ROW_KEYS = ("rows", "results", "records", "data", "runs", "measurements")
#: dict-valued keys merged into the metadata of :func:`load_results`.
_META_KEYS = ("provenance", "meta", "metadata", "env", "environment")
#: the sub-folder of ``results/`` that holds superseded measurements.
ARCHIVE = "archive"


def results_dir() -> Path:
    """``$MUSTAFAR_RESULTS`` if set, else ``mustafar.provenance.results_dir()`` (``<repo>/results``)."""
    env = os.environ.get("MUSTAFAR_RESULTS")
    if env:
        return Path(env)
    from mustafar.provenance import results_dir as repo_results

    return repo_results()


def _json_name(name: str) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"results name must be a plain file name, got {name!r}")
    return name if name.endswith(".json") else name + ".json"


def results_path(name: str) -> Path:
    """Path of ``results/<name>`` (``name`` with or without ``.json``; a plain file name)."""
    return results_dir() / _json_name(name)


def archive_path(name: str) -> Path:
    """Path of ``results/archive/<name>`` (``name`` with or without ``.json``): a superseded
    measurement, for a notebook that shows an earlier run as history."""
    return results_dir() / ARCHIVE / _json_name(name)


def _results_file(name_or_path: str | os.PathLike) -> Path:
    """An existing results file: ``name_or_path`` itself, or ``results/<name>`` for a plain name."""
    p = Path(name_or_path)
    if not p.is_file() and "/" not in str(name_or_path):
        p = results_path(str(name_or_path))
    if not p.is_file():
        raise FileNotFoundError(f"results file {p} does not exist")
    return p


def load_results(name_or_path: str | os.PathLike):
    """Read a results JSON into ``(DataFrame, meta)``.

    Accepted layouts: a list of row dicts; or a dict holding the rows under one of
    ``rows / results / records / data / runs / measurements`` and anything else as metadata
    (nested ``provenance`` / ``meta`` dicts are merged into ``meta``, e.g. device, commit, date).

    Parameters
    ----------
    name_or_path : str or path-like
        A file under ``results/`` (``"kernel_h200"``) or a path.

    Returns
    -------
    (pandas.DataFrame, dict)
        One row per row dict (nested keys flattened with ``.``) and the metadata, which always
        holds ``path``. Raises ``FileNotFoundError`` if the file does not exist.
    """
    import pandas as pd

    p = _results_file(name_or_path)
    data = json.loads(p.read_text())
    meta: dict = {"path": str(p)}
    if isinstance(data, list):
        return pd.DataFrame(data), meta
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON list or object, got {type(data).__name__}")
    rows_key = next((k for k in _ROW_KEYS if isinstance(data.get(k), list)), None)
    if rows_key is None:  # fall back to the first list of dicts
        rows_key = next((k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)), None)
    for k, v in data.items():
        if k == rows_key:
            continue
        if k in _META_KEYS and isinstance(v, dict):
            meta.update(v)
        else:
            meta[k] = v
    rows = data[rows_key] if rows_key is not None else []
    return pd.json_normalize(rows) if rows else pd.DataFrame(), meta


def read_results_json(name_or_path: str | os.PathLike) -> dict:
    """A results JSON as the parsed object itself (for files whose parts are not one row list, such
    as the e2e grid's ``grid`` / ``derived`` / ``best`` / ``longest`` ...).

    Parameters
    ----------
    name_or_path : str or path-like
        A file under ``results/`` (``"e2e_grid_h200"``) or a path (e.g. :func:`archive_path`).

    Returns
    -------
    dict
        Raises ``FileNotFoundError`` if the file does not exist, ``ValueError`` if it is not a JSON
        object.
    """
    p = _results_file(name_or_path)
    data = json.loads(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


def meta_brief(meta: dict | None) -> dict:
    """``{"device", "commit", "date"}`` of a provenance block (or of the ``meta`` of
    :func:`load_results`, which holds the block's keys); the commit read by
    ``mustafar.provenance.commit_of``; None for what the block lacks."""
    from mustafar.provenance import commit_of

    meta = meta or {}
    return {"device": meta.get("device"), "commit": commit_of(meta), "date": meta.get("date")}


def provenance_brief(raw: dict) -> dict:
    """:func:`meta_brief` of a results dict's ``provenance`` block, e.g. for
    ``plotting.annotate_provenance``."""
    return meta_brief(raw.get("provenance"))


def provenance_line(raw: dict, name: str = "") -> str:
    """``"<name>: device ..., commit ..., date ..."`` from :func:`provenance_brief` (``?`` for what
    the provenance block lacks)."""
    brief = provenance_brief(raw)
    return (f"{name}: " if name else "") + ", ".join(f"{k} {brief[k] or '?'}" for k in ("device", "commit", "date"))
