"""RULER-style synthetic long-context tasks, generated offline from a seed.

Tasks follow NVIDIA RULER (Hsieh et al. 2024, ``scripts/data/synthetic``) in their templates,
answers and scoring (string match, :mod:`mustafar.eval.metrics`), with our own generators:

================== ===================================================================== =======
task               what                                                                  score
================== ===================================================================== =======
niah_single        one needle "One of the special magic numbers for <key> is: <7 digits>." all
niah_multikey      4 needles with different keys, one is asked                              all
niah_multivalue    4 needles with the same key, all 4 values are asked                      all
niah_multiquery    4 needles with different keys, all 4 are asked                           all
vt                 variable tracking: one chain ``VAR A = 12345``, ``VAR B = VAR A`` ...     all
                   (4 hops, 5 names), "find all variables assigned 12345"
cwe                common-words extraction: numbered word list, 10 words x ``freq_cw``,     all
                   the rest x ``freq_ucw``, "what are the 10 most common words"
fwe                frequent-words extraction: coded words drawn from a Zipf law,            all
                   "the three most frequently appeared coded words"
================== ===================================================================== =======

Haystack (niah, vt): real English prose of the Python Language Reference
(:mod:`mustafar.eval.texts`), a random contiguous run of sentences per sample. Key words for
needles and the cwe vocabulary are drawn from the same prose's vocabulary (no word-list package).
Context lengths are *measured* with the model's tokenizer on the final rendered prompt (chat
template + answer prefix), filled to at most the target.

Each prompt is rendered with the tokenizer's chat template when it has one (the user turn holds
the task text; the assistant turn starts with RULER's answer prefix), greedy decoding.

Deviations from RULER: cwe below 4K tokens uses ``freq_cw = clamp(L // 128, 6, 30)`` and
``freq_ucw = 1`` (RULER's 30/3 does not fit in 1-2K tokens); no in-context example is prepended
(RULER adds one for vt/cwe/fwe); greedy generation stops early once the output holds as many
answer-shaped items as the task asks for, or at a blank line after an item (:func:`stop_rule`; the
item count comes from the task format, never from the answers); shorter ``MAX_NEW_TOKENS``.

Adaptations for SmolLM2-135M-Instruct (a 135M model) and which tasks are kept: see
:data:`TASK_NOTES` (also written into the result files); ``chance`` per task is the expected score
of an uninformed guess (see :func:`chance_score`).
"""
from __future__ import annotations

import functools
import random
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

from .metrics import ruler_sample_score
from .texts import prose_sentences, prose_text

__all__ = ["RulerSample", "TASKS", "TASK_NOTES", "generate_samples", "render_prompt", "chance_score"]

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")

# Dense SmolLM2-135M-Instruct at 1K tokens (quick profile, 2 samples/task, 2026-11-28; chance in brackets).
TASK_NOTES: dict[str, str] = {
    "niah_single": "kept: dense 100 [0]",
    "niah_multikey": "kept: dense 100 [25]",
    "niah_multivalue": "kept: dense 88 [0]",
    "niah_multiquery": "kept: dense 100 [0]",
    "vt": "DROPPED for SmolLM2-135M: dense 10 [0] at 1K (it repeats one VAR name or echoes the value: "
          "at chance); the generator stays for larger models. Not tried for lack of time: RULER's one-shot "
          "example, fewer hops.",
    "cwe": "DROPPED for SmolLM2-135M: dense 5 [chance ~12] at 1K (freq_cw=8 vs freq_ucw=1): it lists "
           "words from the top of the list, not the frequent ones; the generator stays for larger models.",
    "fwe": "kept with caution: dense 33 [16] (finds the most frequent coded word, rarely the other two)",
}
KEPT_SMOLLM2 = tuple(t for t in TASKS if TASK_NOTES.get(t, "").startswith("kept"))

MAX_NEW_TOKENS = {
    "niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48, "niah_multiquery": 48,
    "vt": 40, "cwe": 80, "fwe": 32,
}

# Early stop (CPU budget): generation ends at a blank line, or once the output holds as many
# answer-shaped items as the task asks for (known from the task format, never from the answers).
_ITEM_RE = {"niah": (re.compile(r"\d{7}"), None), "vt": (re.compile(r"\b[A-Z]{5}\b"), None),
            "cwe": (re.compile(r"\b[a-z]{4,10}\b"), None), "fwe": (re.compile(r"\b[a-z]{3,5}\b"), None)}


def stop_rule(task: str, n_items: int):
    """``stop(text) -> bool`` for :func:`run_samples`: True after ``n_items`` answer-shaped items or a blank line."""
    fam = "niah" if task.startswith("niah") else task
    rx = _ITEM_RE[fam][0]

    def stop(text: str) -> bool:
        items = rx.findall(text)
        if not items:
            return False
        # an item is complete once something follows it
        if len(items) >= n_items and not text.rstrip().endswith(items[-1]):
            return True
        return text.endswith("\n\n")
    return stop


@dataclass
class RulerSample:
    """One generated RULER sample.

    Attributes
    ----------
    task : str
    index : int, sample index within (task, length, seed).
    target_length : int, requested prompt length in tokens.
    n_tokens : int, measured prompt length (model tokenizer, rendered prompt).
    user : str, the task text (user turn).
    answer_prefix : str, start of the assistant turn.
    answers : list of str, expected answers (RULER ``outputs``).
    metric : ``"all"`` or ``"part"``.
    max_new_tokens : int
    chance : float, expected score in [0, 1] of an uninformed guess.
    """

    task: str
    index: int
    target_length: int
    n_tokens: int
    user: str
    answer_prefix: str
    answers: list[str]
    metric: str = "all"
    max_new_tokens: int = 32
    chance: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ vocabularies
@functools.lru_cache(maxsize=1)
def _vocab() -> tuple[str, ...]:
    """Distinct lower-case alphabetic words (4-10 letters) of the prose, sorted (deterministic)."""
    words = re.findall(r"\b[a-z]{4,10}\b", prose_text())
    stop = {"that", "this", "with", "from", "have", "which", "there", "their", "when", "what", "will",
            "been", "were", "they", "than", "then", "into", "also", "such", "only", "some", "more"}
    return tuple(sorted(set(words) - stop))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _key(rng: random.Random, used: set[str]) -> str:
    vocab = _vocab()
    while True:
        k = f"{rng.choice(vocab)}-{rng.choice(vocab)}"
        if k not in used:
            used.add(k)
            return k


def _varname(rng: random.Random, used: set[str]) -> str:
    while True:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in used:
            used.add(v)
            return v


# ------------------------------------------------------------------------------ rendering
def render_prompt(tokenizer, user: str, answer_prefix: str, chat: bool | None = None) -> str:
    """Full prompt text: chat template around ``user`` (if the tokenizer has one) + ``answer_prefix``."""
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        return text + answer_prefix.lstrip()
    return user + "\n" + answer_prefix


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit(tokenizer, target: int, build, n_max: int, chat: bool | None) -> tuple[int, str, str, int]:
    """Largest ``n`` in [1, n_max] with rendered prompt length <= target (binary search).

    ``build(n) -> (user, answer_prefix)``; returns ``(n, user, prefix, n_tokens)``.
    """
    def length(n):
        u, p = build(n)
        return _ntok(tokenizer, render_prompt(tokenizer, u, p, chat)), u, p

    lo, hi = 1, n_max
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        L, u, p = length(mid)
        if L <= target:
            best = (mid, u, p, L)
            lo = mid + 1
        else:
            hi = mid - 1
    if best is None:
        L, u, p = length(1)
        raise ValueError(f"target_length={target} too short for this task (minimum prompt is {L} tokens)")
    return best


def _haystack(rng: random.Random, n: int, start: int) -> list[str]:
    sents = prose_sentences()
    return [sents[(start + i) % len(sents)] for i in range(n)]


def _insert(hay: list[str], items: list[str], depths: list[float]) -> str:
    out = list(hay)
    # insert from the deepest so earlier indices stay valid
    for item, d in sorted(zip(items, depths), key=lambda t: -t[1]):
        out.insert(int(round(d * len(hay))), item)
    return " ".join(out)


# ------------------------------------------------------------------------------ tasks
def _niah(task, rng, tokenizer, target, chat):
    n_needles = 1 if task == "niah_single" else 4
    used: set[str] = set()
    if task == "niah_multivalue":
        keys = [_key(rng, used)] * n_needles
    else:
        keys = [_key(rng, used) for _ in range(n_needles)]
    values = [_number(rng) for _ in range(n_needles)]
    if task in ("niah_single", "niah_multikey"):
        qkeys, answers = [keys[0]], [values[0]]
    elif task == "niah_multivalue":
        qkeys, answers = [keys[0]], values
    else:
        qkeys, answers = keys, values
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    depths = [rng.random() for _ in needles]
    order = list(range(n_needles))
    rng.shuffle(order)
    needles = [needles[i] for i in order]
    start = rng.randrange(len(prose_sentences()))
    query = ", ".join(qkeys[:-1]) + ", and " + qkeys[-1] if len(qkeys) > 1 else qkeys[0]
    typ = "numbers" if len(answers) > 1 else "number"

    def build(n):
        ctx = _insert(_haystack(rng, n, start), needles, depths)
        user = ("Some special magic numbers are hidden within the following text. Make sure to "
                "memorize it. I will quiz you about the numbers afterwards.\n"
                f"{ctx}\nWhat {'are all the special magic numbers' if typ == 'numbers' else 'is the special magic number'} "
                f"for {query} mentioned in the provided text?")
        prefix = f" The special magic {typ} for {query} mentioned in the provided text {'are' if typ == 'numbers' else 'is'}"
        return user, prefix

    n, user, prefix, L = _fit(tokenizer, target, build, len(prose_sentences()), chat)
    chance = 1.0 / n_needles if task == "niah_multikey" else 0.0
    return user, prefix, answers, L, chance, {"keys": keys, "values": values, "n_sentences": n}


def _vt(task, rng, tokenizer, target, chat, num_hops=4):
    used: set[str] = set()
    names = [_varname(rng, used) for _ in range(num_hops + 1)]
    value = str(rng.randint(10000, 99999))
    stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(num_hops)]
    depths = sorted(rng.random() for _ in stmts)
    start = rng.randrange(len(prose_sentences()))

    def build(n):
        ctx = _insert(_haystack(rng, n, start), stmts, depths)
        user = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                f"{ctx}\nQuestion: Find all variables that are assigned the value {value} in the text above.")
        prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, "
                  f"{num_hops + 1} variables are assigned the value {value}, they are: ")
        return user, prefix

    n, user, prefix, L = _fit(tokenizer, target, build, len(prose_sentences()), chat)
    return user, prefix, names, L, 0.0, {"value": value, "n_sentences": n}


def _cwe(task, rng, tokenizer, target, chat, num_cw=10, freq_cw=None, freq_ucw=None):
    # RULER uses freq_cw=30, freq_ucw=3 (long contexts). 300 common-word lines alone are ~1.8K
    # SmolLM2 tokens, so below 4K tokens we scale: freq_cw = clamp(target // 128, 6, 30), freq_ucw = 1.
    if freq_cw is None:
        freq_cw = min(30, max(6, target // 128))
    if freq_ucw is None:
        freq_ucw = 1 if target < 4096 else 3
    vocab = list(_vocab())
    rng.shuffle(vocab)
    common = vocab[:num_cw]
    pool = vocab[num_cw:]
    order_seed = rng.randrange(2**31)

    def build(n_ucw):
        words = common * freq_cw + pool[:n_ucw] * freq_ucw
        r = random.Random(order_seed)
        r.shuffle(words)
        ctx = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        user = ("Below is a numbered list of words. In these words, some appear more often than others. "
                f"Memorize the ones that appear most often.\n{ctx}\nQuestion: What are the {num_cw} most "
                "common words in the above list?")
        prefix = f" Answer: The top {num_cw} words that appear most often in the list are:"
        return user, prefix

    n, user, prefix, L = _fit(tokenizer, target, build, len(pool), chat)
    chance = num_cw / (num_cw + n)  # 10 words guessed uniformly from the distinct words listed
    return user, prefix, list(common), L, chance, {"n_uncommon": n, "freq_cw": freq_cw, "freq_ucw": freq_ucw}


def _fwe(task, rng, tokenizer, target, chat, alpha=2.0, vocab_size=2000):
    letters = string.ascii_lowercase
    used: set[str] = set()
    coded = []
    while len(coded) < vocab_size:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(3, 5)))
        if w not in used:
            used.add(w)
            coded.append(w)
    stream_seed = rng.randrange(2**31)
    # Zipf weights over ranks 1..V; words beyond the stream's sample size simply don't occur.
    weights = [1.0 / (r ** alpha) for r in range(1, vocab_size + 1)]

    def build(n_words):
        r = random.Random(stream_seed)
        words = r.choices(coded, weights=weights, k=n_words)
        ctx = " ".join(words) + " ...."
        user = ("Read the following coded text and track the frequency of each coded word. Find the three "
                f"most frequently appeared coded words. {ctx}\nQuestion: Do not provide any explanation. "
                "Please ignore the dots '....'. What are the three most frequently appeared words in the "
                "above coded text?")
        prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
        return user, prefix

    n, user, prefix, L = _fit(tokenizer, target, build, 20 * target, chat)
    words = random.Random(stream_seed).choices(coded, weights=weights, k=n)
    cnt = Counter(words)
    top = [w for w, _ in cnt.most_common(3)]
    chance = 3 / len(cnt)
    return user, prefix, top, L, chance, {"n_words": n, "distinct": len(cnt)}


_GEN = {"niah_single": _niah, "niah_multikey": _niah, "niah_multivalue": _niah, "niah_multiquery": _niah,
        "vt": _vt, "cwe": _cwe, "fwe": _fwe}


def generate_samples(task: str, tokenizer, target_length: int, n_samples: int, seed: int = 0,
                     chat: bool | None = None) -> list[RulerSample]:
    """Generate ``n_samples`` samples of ``task`` at ``target_length`` tokens, deterministic in ``seed``.

    Parameters
    ----------
    task : one of :data:`TASKS`.
    tokenizer : the model's tokenizer (lengths are measured with it).
    target_length : int >= 64, maximal rendered prompt length in tokens.
    n_samples : int >= 1
    seed : int
    chat : bool or None, render with the chat template (None: if the tokenizer has one).

    Returns
    -------
    list of :class:`RulerSample`
    """
    if task not in _GEN:
        raise ValueError(f"unknown RULER task {task!r}; available: {list(TASKS)}")
    if int(target_length) < 64:
        raise ValueError(f"target_length must be >= 64, got {target_length}")
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    out = []
    for i in range(n_samples):
        rng = random.Random(f"{task}|{target_length}|{seed}|{i}")
        user, prefix, answers, L, chance, extra = _GEN[task](task, rng, tokenizer, int(target_length), chat)
        out.append(RulerSample(task=task, index=i, target_length=int(target_length), n_tokens=L, user=user,
                               answer_prefix=prefix, answers=list(answers), metric="all",
                               max_new_tokens=MAX_NEW_TOKENS[task], chance=chance, extra=extra))
    return out


def chance_score(samples: Sequence[RulerSample]) -> float:
    """Mean uninformed-guess score of samples, in percent.

    niah_multikey: 25 (copying one of the 4 numbers in the context); niah single/multivalue/
    multiquery, vt: 0 (the answers are random 7-digit numbers / 5-letter names); cwe:
    10 / distinct words listed; fwe: 3 / distinct coded words in the text.
    """
    return 100.0 * sum(s.chance for s in samples) / max(1, len(samples))


# ------------------------------------------------------------------------------ runner
def eos_ids(tokenizer) -> list[int]:
    """Token ids that end generation: the tokenizer's EOS plus ``<|endoftext|>`` / ``<|im_end|>`` if known."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    conv = getattr(tokenizer, "convert_tokens_to_ids", None)
    if conv is not None:
        for t in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>"):
            i = conv(t)
            if isinstance(i, int) and i >= 0 and i != getattr(tokenizer, "unk_token_id", None):
                ids.add(i)
    return sorted(ids)


def run_samples(model, tokenizer, samples: Sequence[RulerSample], specs, chat: bool | None = None,
                progress: bool = True) -> dict:
    """Score every spec on the same samples (one dense prefill per sample, one decode per spec).

    Parameters
    ----------
    model, tokenizer : from :func:`mustafar.models.load_model` (tokenizer may be a ``ByteTokenizer``).
    samples : list of :class:`RulerSample` (one task).
    specs : list of :class:`mustafar.eval.runtime.CacheSpec`.

    Returns
    -------
    dict spec.name -> dict(score (percent), sample_scores, preds, mode, bytes_measured,
    bytes_dense, seconds_decode, seconds_prefill_shared)
    """
    import time

    import torch
    from tqdm.auto import tqdm

    from .runtime import build_cache, greedy_decode, needs_queries, prefill

    need_q = needs_queries(specs)
    eos = eos_ids(tokenizer)
    res = {s.name: dict(sample_scores=[], preds=[], mode=s.mode, bytes_measured=0, bytes_dense=0,
                        seconds_decode=0.0, seconds_prefill_shared=0.0) for s in specs}
    it = tqdm(samples, desc=f"{samples[0].task}@{samples[0].target_length}", leave=False, disable=not progress)
    for smp in it:
        text = render_prompt(tokenizer, smp.user, smp.answer_prefix, chat)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        t0 = time.perf_counter()
        state = prefill(model, ids, capture_queries=need_q)
        tp = time.perf_counter() - t0
        for spec in specs:
            r = res[spec.name]
            t0 = time.perf_counter()
            cache, _ = build_cache(model, state, spec, smp.max_new_tokens)
            stop_text = stop_rule(smp.task, len(smp.answers))
            toks = greedy_decode(model, cache, state, smp.max_new_tokens, eos,
                                 stop=lambda t: stop_text(tokenizer.decode(t, skip_special_tokens=True)))
            r["seconds_decode"] += time.perf_counter() - t0
            r["seconds_prefill_shared"] += tp
            if hasattr(cache, "nbytes") and hasattr(cache, "dense_nbytes"):
                r["bytes_measured"] += cache.nbytes()
                r["bytes_dense"] += cache.dense_nbytes()
            pred = tokenizer.decode(toks, skip_special_tokens=True)
            r["preds"].append(pred)
            r["sample_scores"].append(ruler_sample_score(pred, smp.answers, smp.metric))
            del cache
        del state
    for r in res.values():
        r["score"] = 100.0 * sum(r["sample_scores"]) / len(r["sample_scores"])
    return res
