"""Scoring functions: RULER string match and LongBench's English metrics (own implementations).

RULER (NVIDIA/RULER ``eval/synthetic/constants.py``):

- ``string_match_all``: per sample, the fraction of the expected answers that occur
  (case-insensitive substring) in the prediction; averaged over samples, x100.
- ``string_match_part``: per sample, 1 if *any* expected answer occurs, else 0; x100.

LongBench (THUDM/LongBench ``metrics.py``), per (prediction, ground truth) pair, in [0, 1]:

- :func:`qa_f1_score`: token F1 after SQuAD-style normalization (lower case, punctuation and
  articles a/an/the removed, whitespace collapsed).
- :func:`rouge_l_score`: ROUGE-L F1 from the longest common subsequence of whitespace tokens
  (beta = 1). *Deviation*: LongBench calls the ``rouge`` package whose ROUGE-L is summary-level
  (union-LCS over sentences); ours is the plain sentence-level LCS F-measure over the whole text.
- :func:`classification_score`: LongBench's rule (classes found in the prediction, minus those
  that are strict substrings of the ground truth; 1/len(matches) if the ground truth is among them).
- :func:`retrieval_score`: fraction of the numbers in the prediction equal to the paragraph id
  of the ground truth (``"Paragraph 7"`` -> ``"7"``).
- :func:`count_score`: fraction of the numbers in the prediction equal to the ground truth.
- :func:`code_sim_score`: first prediction line without ````` ``, ``#`` or ``//``, compared to the
  ground truth by :func:`levenshtein_ratio` = ``(|a|+|b| - indel_distance) / (|a|+|b|)``
  (= ``2*LCS/(|a|+|b|)`` over characters). This equals python-Levenshtein's ``ratio`` /
  rapidfuzz's ``fuzz.ratio``; *deviation*: fuzzywuzzy (LongBench's dependency) rounds to an
  integer percent and, without python-Levenshtein, uses difflib's matching-block ratio instead;
  we keep the exact, unrounded value.

Chinese metrics (``qa_f1_zh``, ``rouge_zh``, ``retrieval_zh``) are omitted: only LongBench's 16
English tasks are supported.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

__all__ = [
    "string_match_all", "string_match_part", "ruler_sample_score",
    "normalize_answer", "qa_f1_score", "lcs_length", "rouge_l_score", "classification_score",
    "retrieval_score", "count_score", "levenshtein_ratio", "code_sim_score", "METRICS",
]


# ----------------------------------------------------------------------------------------- RULER
def ruler_sample_score(pred: str, refs: Sequence[str], mode: str = "all") -> float:
    """One sample's RULER score in [0, 1].

    Parameters
    ----------
    pred : str, the model output.
    refs : sequence of str, the expected answers (non-empty).
    mode : ``"all"`` (fraction of refs found) or ``"part"`` (1 if any ref found).
    """
    if not refs:
        raise ValueError("refs must be non-empty")
    p = pred.lower()
    hits = [1.0 if r.lower() in p else 0.0 for r in refs]
    if mode == "all":
        return sum(hits) / len(hits)
    if mode == "part":
        return max(hits)
    raise ValueError(f"mode must be 'all' or 'part', got {mode!r}")


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER ``string_match_all`` over samples, in percent (0-100)."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"need equal, non-zero numbers of preds and refs, got {len(preds)} and {len(refs)}")
    return 100.0 * sum(ruler_sample_score(p, r, "all") for p, r in zip(preds, refs)) / len(preds)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER ``string_match_part`` over samples, in percent (0-100)."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"need equal, non-zero numbers of preds and refs, got {len(preds)} and {len(refs)}")
    return 100.0 * sum(ruler_sample_score(p, r, "part") for p, r in zip(preds, refs)) / len(preds)


# ------------------------------------------------------------------------------------ LongBench
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _f1(pred_tokens: Sequence[str], gt_tokens: Sequence[str]) -> float:
    common = Counter(pred_tokens) & Counter(gt_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gt_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Token-level F1 between normalized prediction and ground truth, in [0, 1]."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a)*len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else (prev[j + 1] if prev[j + 1] > cur[j] else cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F1 (beta=1) over whitespace tokens, in [0, 1]; 0 if either side is empty."""
    p, g = prediction.split(), ground_truth.split()
    if not p or not g:
        return 0.0
    lcs = lcs_length(p, g)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(g)
    return 2 * prec * rec / (prec + rec)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **kwargs) -> float:
    """LongBench classification score, in [0, 1]."""
    matches = [c for c in all_classes if c in prediction]
    matches = [m for m in matches if not (m in ground_truth and m != ground_truth)]
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Fraction of numbers in ``prediction`` equal to the id in ``ground_truth`` ("Paragraph N")."""
    ids = re.findall(r"Paragraph (\d+)", ground_truth)
    if not ids:
        raise ValueError(f"ground truth {ground_truth!r} has no 'Paragraph N'")
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == ids[0] for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth, **kwargs) -> float:
    """Fraction of numbers in ``prediction`` equal to ``ground_truth``."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(ground_truth) for n in numbers) / len(numbers)


def levenshtein_ratio(a: str, b: str) -> float:
    """Indel similarity ``2*LCS(a, b) / (len(a)+len(b))`` over characters; 1.0 for two empty strings."""
    if not a and not b:
        return 1.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """LongBench code similarity: first code-looking line of the prediction vs the ground truth."""
    line = ""
    for ln in prediction.lstrip("\n").split("\n"):
        if "`" not in ln and "#" not in ln and "//" not in ln:
            line = ln
            break
    return levenshtein_ratio(line, ground_truth)


METRICS = {
    "qa_f1": qa_f1_score,
    "rouge": rouge_l_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "count": count_score,
    "code_sim": code_sim_score,
}
