"""Greedy generation in the style of gpt-fast for any transformers causal LM and any transformers ``Cache``.

The decode phases are plain functions: :func:`prefill` (the prompt, one forward), :func:`decode_one_token`
(one token, the function that gets compiled) and :func:`decode_n_tokens` (the loop); :func:`generate`
puts them together and is the only place where compile settings live (gpt-fast's ``generate.py:main``).

>>> import mustafar
>>> from transformers import StaticCache
>>> model, tok = mustafar.load_model("smollm2-135m")                          # doctest: +SKIP
>>> ids = tok("Hi", return_tensors="pt").input_ids                            # doctest: +SKIP
>>> cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 64) # doctest: +SKIP
>>> from mustafar.generate import generate
>>> out = generate(model, ids, cache, 64, compile="default")                 # doctest: +SKIP

What compiles (``compile="default"`` or ``"reduce-overhead"``): a cache with ``cache.is_compileable``
(transformers' ``StaticCache`` and ``MustafarCache(..., max_cache_len=L)`` with per-token magnitude
pruning, :mod:`mustafar.cache.static`: preallocated buffers updated in place, lengths as device
tensors, static addresses marked). Asking to compile with any other cache raises ``ValueError`` naming
the cache and why, never a silent eager fallback: ``DynamicCache`` grows by ``torch.cat`` (a new shape
per step); a ``MustafarCache`` without ``max_cache_len`` (or in simulate mode, or with a query-driven /
2:4 strategy) keeps its lengths as Python ints and grows / compacts its buffers on the host, so a
compiled step would specialise on the length and recompile. ``mode="reduce-overhead"`` captures the step as a CUDA graph on CUDA; on the CPU inductor has no
graphs to capture and it behaves as ``"default"``.

Positions: every forward gets explicit ``position_ids`` (transformers 5.17 and 5.24 both take
``position_ids``; the cache keeps its own write offset: ``StaticLayer.cumulative_length``, a
``DynamicLayer``'s length, a ``MustafarLayer``'s counters), so left padding works: a prompt position is
``cumsum(attention_mask) - 1`` (padding gets 1, as ``model.generate`` does) and the ``i``-th new token of
a row sits at ``prompt_valid_tokens + i``. The cache keyword is ``cache`` or ``past_key_values``
(:func:`mustafar.cache_kwargs`, read from ``inspect.signature(type(model).forward)``).

Masks: ``attention_mask`` ``[B, P]`` (1 = token, 0 = padding; left padding) is extended once to a fixed
``[B, P + max_new_tokens]`` mask of ones after the prompt and passed unchanged to every step, so the
compiled step sees one shape (transformers pads it with zeros to a ``StaticCache``'s capacity; future
slots are causally masked anyway). A mask of all ones is dropped (``None``: the maskless fast path).
Works with ``DynamicCache``, ``StaticCache`` and ``MustafarCache`` (its ``"mustafar"`` attention turns a
left-padding mask into a per-row ``kv_start`` for the sparse kernel).

Not done here: sampling (greedy only), stopping at EOS (exactly ``max_new_tokens`` tokens, as a
benchmark wants), compiling the prefill.
"""

from __future__ import annotations

import time

import torch

from mustafar.cache import cache_kwargs

__all__ = ["prefill", "decode_one_token", "decode_n_tokens", "generate", "check_compileable", "release_compiled",
           "COMPILE_MODES"]

#: values of ``generate(compile=...)``
COMPILE_MODES = (None, "default", "reduce-overhead")

_COMPILED: dict = {}  # (mode, backend, fullgraph) -> torch.compile(decode_one_token, ...), filled on first use


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    # logits: [B, q_len, V] -> next token [B, 1] (int64)
    return logits[:, -1].argmax(dim=-1, keepdim=True)


def prefill(model, input_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt through ``model`` into ``cache``; return the greedy next token.

    Parameters
    ----------
    model : transformers causal LM
    input_ids : int64 ``[B, P]``
    cache : any transformers ``Cache`` (empty, or holding a common prefix of every row)
    attention_mask : ``[B, P]`` or ``[B, past + P]`` (1 = token, 0 = padding), optional
    position_ids : int64 ``[B, P]``, optional (default ``past + arange(P)``)

    Returns
    -------
    int64 ``[B, 1]``
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1, **cache_kwargs(model, cache))
    return _greedy(out.logits)


def decode_one_token(model, token: torch.Tensor, cache, position: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One greedy decode step: ``token [B, 1]`` at ``position [B, 1]`` (its RoPE position) -> next token ``[B, 1]``.

    The function :func:`generate` compiles. ``attention_mask`` (optional) is the fixed ``[B, P + N]`` mask
    of the whole generation (see the module doc).
    """
    out = model(input_ids=token, attention_mask=attention_mask, position_ids=position, use_cache=True,
                **cache_kwargs(model, cache))
    return _greedy(out.logits)


def decode_n_tokens(model, token: torch.Tensor, cache, position: torch.Tensor, n: int,
                    attention_mask: torch.Tensor | None = None, step=decode_one_token,
                    cudagraphs: bool = False) -> torch.Tensor:
    """``n`` greedy decode steps starting from ``token [B, 1]`` at ``position [B, 1]``.

    Parameters
    ----------
    step : callable with :func:`decode_one_token`'s signature (e.g. its compiled version)
    cudagraphs : bool
        ``step`` replays a CUDA graph (``mode="reduce-overhead"`` on CUDA): each call is preceded by
        ``torch.compiler.cudagraph_mark_step_begin()`` and its output copied out of the graph's pool.

    Returns
    -------
    int64 ``[B, n]``: the tokens generated after ``token`` (the last one's K/V is not in the cache yet).
    """
    new = []
    for _ in range(int(n)):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        token = step(model, token, cache, position, attention_mask)
        token = token.clone()  # [B, 1]; a CUDA graph overwrites its output at the next replay
        position = position + 1
        new.append(token)
    return torch.cat(new, dim=1) if new else token.new_empty((token.shape[0], 0))


def release_compiled() -> None:
    """Drop the compiled decode steps (and with them the memory pools of their CUDA graphs) and reset dynamo: the
    next compiled :func:`generate` compiles afresh. A benchmark calls it between batches (each batch is a new
    graph anyway under ``dynamic=False``) so that one batch's graph pools do not crowd the next one's memory."""
    _COMPILED.clear()
    torch._dynamo.reset()


def check_compileable(cache) -> None:
    """Raise ``ValueError`` if ``cache`` cannot run under a compiled decode step (see the module doc)."""
    name = type(cache).__name__
    if getattr(cache, "is_compileable", False):
        return
    if name == "MustafarCache":
        why = ("only MustafarCache(model, config, max_cache_len=L) with per_token_magnitude pruning on both sides in "
               "mode='compressed' is compileable (preallocated buffers, lengths on the device, "
               "mustafar.cache.static); this one grows its buffers on the host (no max_cache_len), uses "
               "simulate mode, or a strategy that scores with later queries / has no one-token encoder (output_aware, "
               "think, 2:4), so a compiled step would specialise on its lengths and recompile every step; pass "
               "max_cache_len= or use compile=None")
    elif name == "DynamicCache":
        why = ("it grows by torch.cat, so every decode step has new shapes and buffer addresses; use compile=None "
               "or a transformers StaticCache")
    else:
        why = "cache.is_compileable is False; use compile=None or a transformers StaticCache"
    raise ValueError(f"{name} is not compileable: {why}")


def _compiled_step(mode: str, backend: str, fullgraph: bool):
    key = (mode, backend, fullgraph)
    if key not in _COMPILED:
        kw = {} if backend != "inductor" else {"mode": mode}  # mode= is an inductor option
        _COMPILED[key] = torch.compile(decode_one_token, backend=backend, fullgraph=fullgraph, dynamic=False, **kw)
    return _COMPILED[key]


def _capacity(cache) -> int | None:
    """Tokens a preallocated (compileable, non-sliding) cache holds: its layers' ``max_cache_len``
    (``StaticLayer`` in transformers 5.17 and 5.24); ``None`` for caches that grow."""
    caps = [getattr(layer, "max_cache_len", None) for layer in getattr(cache, "layers", ())
            if getattr(layer, "is_compileable", False) and not getattr(layer, "is_sliding", False)]
    caps = [c for c in caps if isinstance(c, int) and c > 0]
    return min(caps) if caps else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()  # not inference_mode: a cache filled here must stay usable (reset()) outside it
def generate(model, input_ids: torch.Tensor, cache, max_new_tokens: int, compile: str | None = None,
             attention_mask: torch.Tensor | None = None, backend: str = "inductor", fullgraph: bool = True,
             stats: dict | None = None, prefill_chunk: int | None = None) -> torch.Tensor:
    """Greedy generation of exactly ``max_new_tokens`` tokens: :func:`prefill`, then :func:`decode_n_tokens`.

    Parameters
    ----------
    model : transformers causal LM (eval mode)
    input_ids : int64 ``[B, P]``
    cache : a transformers ``Cache`` for ``model``: ``DynamicCache``, ``StaticCache`` (capacity >=
        ``P + max_new_tokens``), :class:`mustafar.MustafarCache`, ... Use a fresh (or ``reset()``) cache.
    max_new_tokens : int >= 1
    compile : ``None`` (eager), ``"default"`` or ``"reduce-overhead"`` (CUDA graphs on CUDA)
        Compiles :func:`decode_one_token` with ``torch.compile(mode=compile, backend=backend,
        fullgraph=fullgraph, dynamic=False)`` (the prefill stays eager). Needs ``cache.is_compileable``:
        otherwise ``ValueError`` (:func:`check_compileable`). The compiled function is built once per
        setting and reused; dynamo recompiles only if the model / cache structure changes (reuse one cache
        with ``cache.reset()`` across calls to keep the compiled graph).
    attention_mask : ``[B, P]`` (1 = token, 0 = left padding), optional
    backend : ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` to test tracing cheaply)
    fullgraph : bool
        ``torch.compile(fullgraph=...)``: True (gpt-fast's choice) makes any graph break an error.
    stats : dict, optional
        Filled with ``prefill_s`` and ``decode_s`` (wall clock, the device synchronised around each phase).
    prefill_chunk : int, optional
        Run the prompt in consecutive pieces of at most this many tokens (each a :func:`prefill` into the same
        cache), as servers do to bound the activation memory of a long prompt at a large batch. Dense caches give
        the same result as one piece; a MustafarCache compresses the tokens that left its window after each piece,
        so later pieces attend to the pruned K/V of earlier ones (what a chunked prefill into a compressed cache
        means). ``None``: the whole prompt in one forward.

    Returns
    -------
    int64 ``[B, P + max_new_tokens]``: the prompt followed by the new tokens (as ``model.generate``).
    """
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r} must be one of {COMPILE_MODES}")
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [B, P] with P >= 1, got shape {tuple(input_ids.shape)}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or int(prefill_chunk) != prefill_chunk
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk={prefill_chunk!r} must be a positive int or None")
    n = int(max_new_tokens)
    step, cudagraphs = decode_one_token, False
    if compile is not None:
        check_compileable(cache)
        step = _compiled_step(compile, backend, bool(fullgraph))
        cudagraphs = compile == "reduce-overhead" and input_ids.device.type == "cuda" and backend == "inductor"
    b, p = input_ids.shape
    dev = input_ids.device
    past = int(cache.get_seq_length())  # one host read, before the loop
    max_len = _capacity(cache)
    if max_len is not None and past + p + n > max_len:
        raise ValueError(f"{type(cache).__name__} holds {max_len} tokens < {past} cached + {p} prompt + {n} new")

    if attention_mask is not None and bool(attention_mask.to(torch.bool).all()):
        attention_mask = None  # no padding: the maskless path
    if attention_mask is None:
        pos = torch.arange(past, past + p, device=dev).unsqueeze(0).expand(b, -1)  # [B, P]
        position = torch.full((b, 1), past + p, dtype=torch.long, device=dev)  # [B, 1]
        full_mask = None
    else:
        if attention_mask.shape != (b, past + p):
            raise ValueError(f"attention_mask must be [B, past + P] = {[b, past + p]}, got {list(attention_mask.shape)}")
        am = attention_mask.to(device=dev, dtype=torch.long)  # [B, past + P]
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)[:, past:]  # [B, P] (padding: 1, as model.generate)
        position = am.sum(-1, keepdim=True)  # [B, 1]: first new token of each row
        full_mask = torch.cat([am, am.new_ones((b, n))], dim=1)  # [B, past + P + N], fixed for every step

    _sync(dev)
    t0 = time.perf_counter()
    c = p if prefill_chunk is None else int(prefill_chunk)
    for i in range(0, p, c):  # pieces [i, j) of the prompt; the last one's greedy token starts the decode
        j = min(p, i + c)
        prompt_mask = None if full_mask is None else full_mask[:, : past + j]
        token = prefill(model, input_ids[:, i:j], cache, prompt_mask, pos[:, i:j])  # [B, 1]
    _sync(dev)
    t1 = time.perf_counter()
    rest = decode_n_tokens(model, token, cache, position, n - 1, full_mask, step=step, cudagraphs=cudagraphs)
    _sync(dev)
    t2 = time.perf_counter()
    if stats is not None:
        stats.update(prefill_s=t1 - t0, decode_s=t2 - t1)
    return torch.cat([input_ids, token, rest], dim=1)
