"""LongBench (v1, English) runner over the released JSONL files in a local folder.

No data is downloaded. Supply LongBench's ``data/`` folder (the ``data.zip`` of the
``THUDM/LongBench`` dataset release, unpacked) and point ``data_dir`` at it; files are named
``<dataset>.jsonl``, e.g. ``narrativeqa.jsonl`` ... ``repobench-p.jsonl``, one JSON object per line
with at least ``input``, ``context``, ``answers`` (list), ``all_classes`` (list or null),
``length``, ``_id``. They are read with ``datasets.load_dataset("json", data_files=...)``.

What follows LongBench (``config/dataset2prompt.json``, ``dataset2maxlen.json``, ``pred.py``,
``eval.py``), reimplemented here:

- the per-dataset prompt templates (:data:`DATASET2PROMPT`) and maximal generation lengths
  (:data:`DATASET2MAXLEN`);
- middle truncation: a prompt longer than ``max_length`` tokens keeps its first and last
  ``max_length // 2`` tokens;
- the chat template is applied except for trec, triviaqa, samsum, lcc, repobench-p (few-shot /
  completion tasks); for samsum generation also stops at a newline;
- scoring: per sample the max over ground truths; for trec, triviaqa, samsum only the first line of
  the prediction is scored; dataset score = mean x 100 (:data:`DATASET2METRIC`, metrics in
  :mod:`mustafar.eval.metrics`).

Only the 16 English datasets are supported (the Chinese ones and their metrics are omitted).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .metrics import METRICS

__all__ = ["DATASETS", "DATASET2PROMPT", "DATASET2MAXLEN", "DATASET2METRIC", "find_files", "load_longbench",
           "build_prompt", "truncate_middle", "score_dataset", "run_longbench", "MISSING_DATA_HELP"]

DATASETS = ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report",
            "qmsum", "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en",
            "lcc", "repobench-p")

_QA_MULTI = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
             "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
             "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")

DATASET2PROMPT = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                   "question asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
                   "\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using "
                   "a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
              "single phrase or sentence if possible. If the question cannot be answered based on the information in "
              "the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
              "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based "
              "on the above article as concisely as you can, using a single phrase or sentence if possible. If the "
              "question cannot be answered based on the information in the article, write \"unanswerable\". If the "
              "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
              "explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
                       "based on the above text, only give me the answer and do not output any other words.\n\n"
                       "Question: {input}\nAnswer:",
    "hotpotqa": _QA_MULTI,
    "2wikimqa": _QA_MULTI,
    "musique": _QA_MULTI,
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
                  "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
             "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
             "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news articles. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
                  "Now, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
                "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
                     "carefully read these paragraphs and determine how many unique paragraphs there are after "
                     "removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
                     "{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The "
                     "output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
                            "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\n"
                            "Please enter the number of the paragraph that the abstract is from. The answer format must "
                            "be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

DATASET2MAXLEN = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}

DATASET2METRIC = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1", "2wikimqa": "qa_f1",
    "musique": "qa_f1", "gov_report": "rouge", "qmsum": "rouge", "multi_news": "rouge", "trec": "classification",
    "triviaqa": "qa_f1", "samsum": "rouge", "passage_count": "count", "passage_retrieval_en": "retrieval",
    "lcc": "code_sim", "repobench-p": "code_sim",
}

NO_CHAT = ("trec", "triviaqa", "samsum", "lcc", "repobench-p")
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum")

MISSING_DATA_HELP = (
    "LongBench data not found in {dir!r}. No data is downloaded by mustafar: get LongBench's released data "
    "(the THUDM/LongBench dataset's data.zip), unpack it, and pass its folder as data_dir (or set "
    "MUSTAFAR_LONGBENCH_DIR). Expected files: {files}."
)


def find_files(data_dir, datasets: Sequence[str] = DATASETS) -> dict[str, Path]:
    """Map dataset name -> existing ``<data_dir>/<name>.jsonl`` (missing ones left out)."""
    bad = [d for d in datasets if d not in DATASET2PROMPT]
    if bad:
        raise ValueError(f"unknown LongBench dataset(s) {bad}; English datasets: {list(DATASETS)}")
    if data_dir is None:
        return {}
    root = Path(data_dir).expanduser()
    return {d: root / f"{d}.jsonl" for d in datasets if (root / f"{d}.jsonl").is_file()}


def load_longbench(data_dir, datasets: Sequence[str] = DATASETS, n_samples: int | None = None,
                   warn: bool = True) -> dict[str, list[dict]]:
    """Read LongBench JSONL files with ``datasets.load_dataset("json", ...)``.

    Parameters
    ----------
    data_dir : folder holding ``<dataset>.jsonl`` files, or None (then ``$MUSTAFAR_LONGBENCH_DIR``).
    datasets : names among :data:`DATASETS`.
    n_samples : keep the first ``n`` records of each dataset (None: all).
    warn : print :data:`MISSING_DATA_HELP` when nothing is found.

    Returns
    -------
    dict name -> list of records (dicts); empty when no file is present (the caller skips).
    """
    if data_dir is None:
        data_dir = os.environ.get("MUSTAFAR_LONGBENCH_DIR")
    files = find_files(data_dir, datasets)
    if not files:
        if warn:
            print(MISSING_DATA_HELP.format(dir=str(data_dir), files=", ".join(f"{d}.jsonl" for d in datasets)))
        return {}
    from datasets import load_dataset

    out = {}
    for name, path in files.items():
        ds = load_dataset("json", data_files=str(path), split="train")
        if n_samples is not None:
            ds = ds.select(range(min(int(n_samples), len(ds))))
        out[name] = [dict(r) for r in ds]
    return out


def build_prompt(dataset: str, record: dict) -> str:
    """LongBench prompt of ``record`` (``{context}``/``{input}`` filled in) for ``dataset``."""
    if dataset not in DATASET2PROMPT:
        raise ValueError(f"unknown LongBench dataset {dataset!r}")
    return DATASET2PROMPT[dataset].format(context=record.get("context", ""), input=record.get("input", ""))


def truncate_middle(ids: list[int], max_length: int) -> list[int]:
    """Keep the first and last ``max_length // 2`` tokens when ``len(ids) > max_length``."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if len(ids) <= max_length:
        return list(ids)
    half = max_length // 2
    return list(ids[:half]) + list(ids[-half:])


def score_prediction(dataset: str, pred: str, answers: Sequence[str], all_classes=None) -> float:
    """LongBench score in [0, 1] of one prediction: max over ground truths."""
    if dataset in FIRST_LINE_ONLY:
        pred = pred.lstrip("\n").split("\n")[0]
    fn = METRICS[DATASET2METRIC[dataset]]
    return max(fn(pred, gt, all_classes=all_classes or ()) for gt in answers) if answers else 0.0


def score_dataset(dataset: str, preds: Sequence[str], records: Sequence[dict]) -> float:
    """Mean score x 100 over records (LongBench ``scorer``)."""
    if len(preds) != len(records) or not preds:
        raise ValueError(f"need equal, non-zero numbers of preds and records, got {len(preds)}, {len(records)}")
    tot = sum(score_prediction(dataset, p, r["answers"], r.get("all_classes")) for p, r in zip(preds, records))
    return round(100.0 * tot / len(preds), 2)


def encode_record(tokenizer, dataset: str, record: dict, max_length: int, chat: bool | None = None) -> list[int]:
    """Token ids of the (middle-truncated, maybe chat-wrapped) prompt of ``record``."""
    text = build_prompt(dataset, record)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_length:
        half = max_length // 2
        text = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(ids[-half:], skip_special_tokens=True)
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat and dataset not in NO_CHAT:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_longbench(model, tokenizer, records_by_dataset: dict, specs, max_length: int = 7500,
                  max_new_tokens_cap: int | None = None, progress: bool = True) -> dict:
    """Score every spec on every dataset (one dense prefill per record, one decode per spec).

    Parameters
    ----------
    records_by_dataset : from :func:`load_longbench`.
    specs : list of :class:`mustafar.eval.runtime.CacheSpec`.
    max_length : prompt budget in tokens (LongBench uses the model's context minus room to generate;
        SmolLM2 has 8192 positions).
    max_new_tokens_cap : optional cap below ``DATASET2MAXLEN`` (to fit a CPU time budget; recorded).

    Returns
    -------
    dict (dataset, spec.name) -> dict(score, preds, mode, seconds_decode)
    """
    import time

    import torch
    from tqdm.auto import tqdm

    from .ruler import eos_ids
    from .runtime import build_cache, greedy_decode, needs_queries, prefill

    need_q = needs_queries(specs)
    eos = eos_ids(tokenizer)
    out = {}
    for ds, records in records_by_dataset.items():
        maxlen = DATASET2MAXLEN[ds] if max_new_tokens_cap is None else min(DATASET2MAXLEN[ds], max_new_tokens_cap)
        stop = (lambda toks: "\n" in tokenizer.decode(toks[-2:], skip_special_tokens=True)) if ds == "samsum" else None
        preds = {s.name: [] for s in specs}
        secs = {s.name: 0.0 for s in specs}
        for rec in tqdm(records, desc=f"longbench:{ds}", leave=False, disable=not progress):
            ids = torch.tensor([encode_record(tokenizer, ds, rec, max_length)])
            state = prefill(model, ids, capture_queries=need_q)
            for spec in specs:
                t0 = time.perf_counter()
                cache, _ = build_cache(model, state, spec, maxlen)
                toks = greedy_decode(model, cache, state, maxlen, eos, stop=stop)
                secs[spec.name] += time.perf_counter() - t0
                preds[spec.name].append(tokenizer.decode(toks, skip_special_tokens=True))
        for spec in specs:
            out[(ds, spec.name)] = dict(score=score_dataset(ds, preds[spec.name], records), preds=preds[spec.name],
                                        mode=spec.mode, seconds_decode=secs[spec.name], max_new_tokens=maxlen,
                                        n_samples=len(records))
    return out
