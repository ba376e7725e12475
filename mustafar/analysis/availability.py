"""Which parts of ``mustafar`` import right now, so that a notebook can say plainly up front what it
cannot show yet (every notebook prints :func:`describe_parts` of the parts it uses)."""

from __future__ import annotations

import importlib
from typing import Iterable

__all__ = ["PARTS", "available", "missing_parts", "describe_parts"]

#: the parts of the package the notebooks use, as ``name -> (module, attributes)``; public names
#: only (``mustafar.MustafarCache``, not the module that defines it).
PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "models": ("mustafar.models", ("load_model",)),
    "capture": ("mustafar.capture", ("capture_qkv",)),
    "pruning": ("mustafar.pruning", ("prune", "STRATEGIES")),
    "format": ("mustafar.format", ("format_bytes_ratio", "paper_format_bytes_ratio")),
    "ops": ("mustafar.ops", ("sparse_decode",)),
    "bench_cpu": ("mustafar.bench.cpu", ()),
    "cache": ("mustafar", ("MustafarConfig", "MustafarCache")),
    "eval": ("mustafar.eval", ("run_sweep", "summarize", "pareto")),
}


def _check(part: str) -> None:
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; known: {sorted(PARTS)}")


def _part_problem(part: str) -> str | None:
    module, attrs = PARTS[part]
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available", say why
        return f"{module} does not import ({type(e).__name__}: {e})"
    gone = [a for a in attrs if not hasattr(mod, a)]
    return f"{module} lacks {', '.join(gone)}" if gone else None


def available(part: str) -> bool:
    """True iff the named part (a key of :data:`PARTS`) imports and has its public attributes."""
    _check(part)
    return _part_problem(part) is None


def missing_parts(parts: Iterable[str] | None = None) -> dict[str, str]:
    """``{part: why}`` for every part (of ``parts``, default all of :data:`PARTS`) not usable now."""
    out = {}
    for p in parts if parts is not None else PARTS:
        _check(p)
        why = _part_problem(p)
        if why is not None:
            out[p] = why
    return out


def describe_parts(parts: Iterable[str]) -> str:
    """One line per part: ``ok`` or ``NOT AVAILABLE: why`` (what a notebook prints up front)."""
    lines = []
    for p in parts:
        why = _part_problem(p) if p in PARTS else f"unknown part {p!r}"
        lines.append(f"{p:10s} {'ok' if why is None else 'NOT AVAILABLE: ' + why}")
    return "\n".join(lines)
