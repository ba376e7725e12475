"""Prompts and decoding of the peers: kvpress's pipeline split (context compressed, question after)
and its ``generate_answer``, on the accuracy suite's RULER samples."""
from __future__ import annotations

import torch

__all__ = ["split_prompt", "preprocess", "answer"]


def split_prompt(user: str) -> tuple[str, str]:
    """Split a RULER user turn into (context, question) at its last newline (every task's question
    line follows the context after a newline)."""
    i = user.rfind("\n")
    if i <= 0:
        raise ValueError("no newline between context and question in the user turn")
    return user[:i], user[i:]


def preprocess(tokenizer, context: str, question: str, answer_prefix: str):
    """``KVPressTextGenerationPipeline.preprocess`` for one question (kvpress 0.5.5; the test checks
    they agree): chat template around ``context + question``, split so that the question, the
    template's suffix and the answer prefix come after the compressed context; without a chat template
    (Gemma 3 270M is a base model) BOS + context, and ``"\\n"`` as the suffix. Own copy so that the
    MUSTAFAR cells, which run in the main environment (``MustafarCache`` needs transformers >= 5.17),
    see the same token ids. Returns (context_ids [1, T], question_ids [1, Q])."""
    if tokenizer.chat_template is None:
        context = (getattr(tokenizer, "bos_token", "") or "") + context
        suffix = "\n"
    else:
        sep = "#" * (len(context) + 10)
        context = tokenizer.apply_chat_template([{"role": "user", "content": context + sep}],
                                                add_generation_prompt=True, tokenize=False, enable_thinking=False)
        context, suffix = context.split(sep)
    q = question + suffix + answer_prefix
    enc = lambda t: torch.tensor([tokenizer.encode(t, add_special_tokens=False)])  # noqa: E731
    return enc(context), enc(q)


@torch.inference_mode()
def answer(model, tokenizer, cache, question_ids, context_length: int, max_new_tokens: int, stop=None):
    """``KVPressTextGenerationPipeline.generate_answer`` (same positions, greedy, EOS rule) plus an
    optional ``stop(text)`` early stop. Returns (decoded text, tokens written to the cache)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    pos = torch.arange(context_length, context_length + question_ids.shape[1]).unsqueeze(0)
    out = model(input_ids=question_ids, past_key_values=cache, position_ids=pos, logits_to_keep=1)
    pos = pos[:, -1:] + 1
    ids = [int(out.logits[0, -1].argmax())]
    for i in range(max_new_tokens - 1):
        if stop is not None and stop(tokenizer.decode(ids, skip_special_tokens=True)):
            break
        out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, position_ids=pos + i)
        ids.append(int(out.logits[0, -1].argmax()))
        if ids[-1] in eos:
            break
    # tokens written to the cache: the question and every generated token but the last
    return tokenizer.decode(ids, skip_special_tokens=True), question_ids.shape[1] + len(ids) - 1


# ------------------------------------------------------------------------------ prompt files
def _ids_sha(cids, qids) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps([list(map(int, cids)), list(map(int, qids))]).encode()).hexdigest()[:16]


def build_samples(tokenizer, task: str, length: int, n: int, seed: int = 0) -> list[dict]:
    """The suite's RULER samples of one (task, length) cell as token ids, both variants:
    ``[{index, answers, metric, max_new_tokens, chance, ids: {"std": [ctx, q], "qic": [ctx, q]},
    ids_sha256: {...}}]`` (``qic``: the question inside the compressed context)."""
    from .. import ruler

    out = []
    for smp in ruler.generate_samples(task, tokenizer, int(length), int(n), seed=seed):
        ctx, q = split_prompt(smp.user)
        ids, sha = {}, {}
        for v, (c_text, q_text) in (("std", (ctx, q)), ("qic", (ctx + q, ""))):
            c, qq = preprocess(tokenizer, c_text, q_text, smp.answer_prefix.lstrip())
            ids[v] = [c[0].tolist(), qq[0].tolist()]
            sha[v] = _ids_sha(*ids[v])
        out.append(dict(index=smp.index, answers=list(smp.answers), metric=smp.metric,
                        max_new_tokens=smp.max_new_tokens, chance=smp.chance, ids=ids, ids_sha256=sha))
    return out


def prompt_key(model: str, task: str, length: int, n: int, seed: int) -> str:
    return f"{model}|{task}|{int(length)}|{int(n)}|{int(seed)}"


def cell_samples(prompts_file, model: str, tokenizer, task: str, length: int, n: int, seed: int = 0) -> list[dict]:
    """:func:`build_samples` through an optional prompts file (JSON, written atomically).

    A (model, task, length, samples, seed) entry already in the file is used as it is, otherwise it is
    built with ``tokenizer`` and added. ``make peers`` lets the main environment (transformers 5.24)
    write the file and the peers environment (transformers 5.2) read it: 5.2 tokenizes Gemma 3's GGUF
    vocabulary differently (e.g. "capital" into pieces), so both environments must share token ids,
    not texts. Decoding the model's answers agrees between the two versions.
    """
    import json
    from pathlib import Path

    from mustafar.provenance import write_json_atomic

    if prompts_file is None:
        return build_samples(tokenizer, task, length, n, seed)
    p = Path(prompts_file)
    data = json.loads(p.read_text()) if p.is_file() else {}
    key = prompt_key(model, task, length, n, seed)
    if key not in data:
        import transformers

        data[key] = dict(samples=build_samples(tokenizer, task, length, n, seed),
                         tokenized_with=f"transformers {transformers.__version__}")
        write_json_atomic(data, p, indent=None)
    return data[key]["samples"]
