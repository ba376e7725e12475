"""Offline natural-English text used as RULER haystack and for perplexity.

Source: the Python standard library's ``pydoc_data/topics.py`` (the prose of the Python
Language Reference, shipped with every CPython install, ~465 KB on 3.11). We keep only prose
paragraphs: headings, indented blocks (code, grammar rules, tables) and ``>>>`` examples are
dropped, and hard-wrapped lines are joined. The result is ~130 KB (~30K SmolLM2 tokens) of real English documentation
prose, deterministic for a given Python version (:func:`text_fingerprint` records which).
"""
from __future__ import annotations

import functools
import hashlib
import re

__all__ = ["prose_paragraphs", "prose_text", "prose_sentences", "text_fingerprint", "TEXT_SOURCE"]

TEXT_SOURCE = "python-stdlib:pydoc_data/topics.py (Python Language Reference prose)"

_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}\s*$")


@functools.lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the Python Language Reference, in the module's key order.

    Returns
    -------
    tuple of str
        One paragraph per entry, whitespace-normalized, each at least 80 characters and
        ending with a period.
    """
    from pydoc_data import topics  # stdlib, no side effects

    paras: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics.topics):
        body = topics.topics[key]
        for block in re.split(r"\n\s*\n", body):
            lines = block.split("\n")
            if not lines or any(_HEADING_RULE.match(ln) for ln in lines):
                continue
            if any(ln.startswith((" ", "\t")) or ln.lstrip().startswith(">>>") for ln in lines):
                continue
            para = " ".join(ln.strip() for ln in lines).strip()
            para = re.sub(r"\s+", " ", para).replace("**", "")
            if len(para) < 80 or not para.endswith(".") or para in seen:
                continue
            if "::=" in para or para.count('"') > len(para) / 15:
                continue
            seen.add(para)
            paras.append(para)
    return tuple(paras)


@functools.lru_cache(maxsize=1)
def prose_text() -> str:
    """All prose paragraphs joined by blank lines (one long natural-English document)."""
    return "\n\n".join(prose_paragraphs())


@functools.lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """The prose split into sentences (split after ``. `` followed by an upper-case letter)."""
    out: list[str] = []
    for para in prose_paragraphs():
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", para):
            s = s.strip()
            if len(s) >= 20:
                out.append(s)
    return tuple(out)


def text_fingerprint() -> str:
    """Short sha256 of :func:`prose_text` (differs between Python versions)."""
    return hashlib.sha256(prose_text().encode()).hexdigest()[:12]
