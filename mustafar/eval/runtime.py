"""Shared model-running core of the evaluation: one dense prefill, many pruned decodes.

Every evaluated configuration (a :class:`CacheSpec`) is applied the paper's way: the prompt is
prefilled with dense attention, then the cached K/V of all but the last ``local_window`` tokens
are pruned, and the answer is decoded from that cache. Because the prefill is dense, it is the
same for every configuration: :func:`prefill` runs it **once** per prompt (with a
``DynamicCache``; queries are captured when a query-driven strategy needs them) and
:func:`build_cache` replays its K/V into a fresh cache per configuration:

- ``impl="dense"``: a ``DynamicCache`` (the dense baseline).
- ``impl="mustafar"`` (every non-dense spec): :class:`mustafar.cache.MustafarCache`, with
  ``mode="compressed"`` (bitmap store, sparse decode attention) when each pruned side has a fixed
  kept count per token vector (per-token magnitude, 2:4, ThinK, output-aware per-token) and
  ``mode="simulate"`` (dense twin, pruned entries zeroed) otherwise (per-channel magnitude,
  output-aware per-channel). Replaying = calling ``cache.update(k, v, layer, {"query_states": q})``
  with the prefill's K/V and its captured post-RoPE queries ``q [1, H_q, T, D]``, which is exactly
  what the model's own prefill call does (its prefill attention is dense; the query-driven
  strategies ``output_aware`` / ``think`` score the prompt's tokens with those queries, window 32);
  ``tests/test_eval.py`` checks replay == real prefill token for token. Generated tokens are pruned
  too once they leave the local window (decode-time chunks of 256 tokens).

Decoding is greedy.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

__all__ = ["CacheSpec", "PrefillState", "prefill", "build_cache", "restore_sliding_lengths", "greedy_decode", "format_bytes_ratio",
           "ByteTokenizer", "QUERY_STRATEGIES", "COMPRESSED_STRATEGIES", "needs_queries"]

QUERY_STRATEGIES = ("output_aware", "think")
# Strategies with a fixed kept count per token vector (MustafarCache mode="compressed"); output_aware
# only with granularity "per_token" (see CacheSpec.mode).
COMPRESSED_STRATEGIES = ("per_token_magnitude", "semi_structured_2_4", "think", "output_aware")


@dataclass(frozen=True)
class CacheSpec:
    """One KV-cache configuration of the sweep.

    Parameters
    ----------
    k_strategy, v_strategy : str, keys of ``mustafar.pruning.STRATEGIES``.
    k_sparsity, v_sparsity : float in [0, 1).
    local_window : int, most recent tokens kept dense (paper: 32).
    k_granularity, v_granularity : ``"per_token"`` / ``"per_channel"``, only for ``output_aware``.
    value_dtype : ``"model"`` or ``"fp8_e4m3"``: the stored value type of both sides
        (:class:`mustafar.MustafarConfig` ``k_value_dtype`` / ``v_value_dtype``).
    """

    k_strategy: str = "per_token_magnitude"
    v_strategy: str = "per_token_magnitude"
    k_sparsity: float = 0.0
    v_sparsity: float = 0.0
    local_window: int = 32
    k_granularity: str = "per_token"
    v_granularity: str = "per_token"
    value_dtype: str = "model"

    @property
    def is_dense(self) -> bool:
        return self.k_sparsity == 0.0 and self.v_sparsity == 0.0

    @property
    def impl(self) -> str:
        """``"dense"`` (``DynamicCache``) or ``"mustafar"`` (``MustafarCache``; see the module docstring)."""
        return "dense" if self.is_dense else "mustafar"

    @property
    def needs_queries(self) -> bool:
        """Whether a pruned side is query-driven (the replay then needs the prefill's queries)."""
        return any(s in QUERY_STRATEGIES and sp > 0.0
                   for s, sp in ((self.k_strategy, self.k_sparsity), (self.v_strategy, self.v_sparsity)))

    @property
    def mode(self) -> str:
        """The cache mode used: ``"dense"``, ``"compressed"`` or ``"simulate"``.

        ``"compressed"`` when every side with sparsity > 0 is ``per_token_magnitude``,
        ``semi_structured_2_4``, ``think`` or ``output_aware`` with granularity ``per_token``;
        ``"simulate"`` otherwise (``per_channel_magnitude``, ``output_aware`` per-channel).
        """
        if self.is_dense:
            return "dense"
        ok = all(sp == 0.0 or (s in COMPRESSED_STRATEGIES and (s != "output_aware" or g == "per_token"))
                 for s, sp, g in ((self.k_strategy, self.k_sparsity, self.k_granularity),
                                  (self.v_strategy, self.v_sparsity, self.v_granularity)))
        return "compressed" if ok else "simulate"

    @property
    def name(self) -> str:
        def one(strat, sp, gran):
            if sp == 0.0:
                return "dense"
            tag = {"per_token_magnitude": "tok", "per_channel_magnitude": "chan", "output_aware": "oa",
                   "think": "think", "semi_structured_2_4": "2:4"}.get(strat, strat)
            if strat == "output_aware":
                tag += "-" + ("tok" if gran == "per_token" else "chan")
            if strat == "semi_structured_2_4":
                return tag
            return f"{tag}{int(round(sp * 100))}"
        return f"K={one(self.k_strategy, self.k_sparsity, self.k_granularity)},V={one(self.v_strategy, self.v_sparsity, self.v_granularity)}"

    def to_dict(self) -> dict:
        return asdict(self)


def _strategy_for_cache(strat: str, sp: float) -> str:
    # A dense side of a half-pruned config: per-token at 0 is stored unpruned (cache fast path).
    return "per_token_magnitude" if sp == 0.0 else strat


def _strategy_kwargs(strat: str, sp: float, gran: str) -> dict:
    # output_aware: the granularity; its window (32) and ThinK's obs_window (32) keep the cache defaults.
    return {"granularity": gran} if strat == "output_aware" and sp > 0.0 else {}


def needs_queries(specs) -> bool:
    """Whether any spec of ``specs`` needs the prefill's queries (``prefill(capture_queries=True)``)."""
    return any(s.needs_queries for s in specs if not s.is_dense)


class ByteTokenizer:
    """UTF-8 byte tokenizer (id = byte + 3; 0 pad, 1 bos, 2 eos) for random-weight presets in tests.

    Implements the small part of the tokenizer API the evaluation uses.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    chat_template = None

    def __call__(self, text, add_special_tokens: bool = False, **kw):
        return {"input_ids": [b + 3 for b in text.encode("utf-8")]}

    def encode(self, text, add_special_tokens: bool = False, **kw):
        return self(text)["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = True, **kw):
        return bytes(i - 3 for i in ids if i >= 3 and i - 3 < 256).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------- prefill
@dataclass
class PrefillState:
    """Result of one dense prefill.

    Attributes
    ----------
    keys, values : list (per layer) of Tensor ``[1, H_kv, T, D]`` post-RoPE K and V.
    queries : list (per layer) of Tensor ``[1, H_q, T, D]`` post-RoPE queries, or None.
    last_logits : Tensor ``[V]`` fp32, logits after the last prompt token.
    n_tokens : int, T.
    """

    keys: list
    values: list
    queries: list | None
    last_logits: torch.Tensor
    n_tokens: int


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, capture_queries: bool = False) -> PrefillState:
    """Dense prefill of one prompt.

    Parameters
    ----------
    model : causal LM.
    input_ids : LongTensor ``[1, T]``.
    capture_queries : bool, also keep every layer's post-RoPE queries (for output-aware / ThinK).
    """
    from transformers import DynamicCache

    from mustafar.cache import cache_kwargs
    from mustafar.capture import recording_queries

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got shape {tuple(input_ids.shape)}")
    cache = DynamicCache(config=model.config)
    with (recording_queries(model) if capture_queries else contextlib.nullcontext({})) as recorded:
        out = model(input_ids=input_ids.to(model.device), **cache_kwargs(model, cache), use_cache=True,
                    logits_to_keep=1)
    queries = [recorded[i] for i in range(len(cache.layers))] if capture_queries else None
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return PrefillState(keys, values, queries, out.logits[0, -1].float(), int(input_ids.shape[1]))


# --------------------------------------------------------------------------------- caches
def build_cache(model, state: PrefillState, spec: CacheSpec, max_new_tokens: int = 64):
    """A fresh cache for ``spec`` holding the (pruned) prefill K/V of ``state``.

    Dense specs get a ``DynamicCache``; every other spec a ``MustafarCache`` in ``spec.mode``, fed
    the prefill's K/V (and, for query-driven strategies, its captured queries) layer by layer.

    Returns
    -------
    cache : transformers ``Cache``
    mode : str, ``spec.mode``
    """
    from transformers import DynamicCache

    if spec.is_dense:
        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(zip(state.keys, state.values)):
            cache.update(k.clone(), v.clone(), i)
        restore_sliding_lengths(cache, state.n_tokens)
        return cache, spec.mode
    from mustafar import MustafarCache, MustafarConfig

    if spec.needs_queries and state.queries is None:
        raise ValueError(f"{spec.name} is query-driven and needs queries: prefill(..., capture_queries=True)")
    cfg = MustafarConfig(
        k_sparsity=spec.k_sparsity, v_sparsity=spec.v_sparsity,
        k_strategy=_strategy_for_cache(spec.k_strategy, spec.k_sparsity),
        v_strategy=_strategy_for_cache(spec.v_strategy, spec.v_sparsity),
        k_strategy_kwargs=_strategy_kwargs(spec.k_strategy, spec.k_sparsity, spec.k_granularity),
        v_strategy_kwargs=_strategy_kwargs(spec.v_strategy, spec.v_sparsity, spec.v_granularity),
        local_window=spec.local_window, mode=spec.mode,
        k_value_dtype=spec.value_dtype, v_value_dtype=spec.value_dtype)
    cache = MustafarCache(model, cfg)  # grows with the sequence: never more bytes than the DynamicCache
    for i, (k, v) in enumerate(zip(state.keys, state.values)):
        if spec.needs_queries:
            cache.update(k, v, i, {"query_states": state.queries[i]})  # q [1, H_q, T, D] post-RoPE
        else:
            cache.update(k, v, i)
    restore_sliding_lengths(cache, state.n_tokens)
    cache.discard_handoff()  # a replay: no attention call follows these updates
    return cache, spec.mode


def restore_sliding_lengths(cache, n_tokens: int) -> None:
    """A replayed sliding-window layer (Gemma 3) holds only its last ``window - 1`` tokens, so replay
    counts that many; its masks and the model's positions need the length it really saw."""
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) and hasattr(layer, "cumulative_length"):
            layer.cumulative_length = int(n_tokens)


@torch.inference_mode()
def greedy_decode(model, cache, state: PrefillState, max_new_tokens: int, eos_ids: Sequence[int] = (),
                  stop=None) -> list[int]:
    """Greedy tokens after the prompt: the first from the prefill's logits, the rest through ``cache``.

    ``stop(tokens) -> bool`` may end generation early. EOS tokens are not included.
    """
    from mustafar.cache import cache_kwargs

    eos = set(int(e) for e in eos_ids if e is not None)
    nxt = int(state.last_logits.argmax())
    out: list[int] = []
    for step in range(max_new_tokens):
        if nxt in eos:
            break
        out.append(nxt)
        if step == max_new_tokens - 1 or (stop is not None and stop(out)):
            break
        logits = model(input_ids=torch.tensor([[nxt]], device=model.device), **cache_kwargs(model, cache),
                       use_cache=True).logits
        nxt = int(logits[0, -1].argmax())
    return out


@torch.inference_mode()
def teacher_forced_nll(model, cache, state: PrefillState, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of ``targets [N]`` fed one at a time through ``cache`` after the prefill.

    ``nll[0]`` comes from the prefill's last logits; ``nll[i]`` from the decode step fed ``targets[i-1]``.
    """
    from mustafar.cache import cache_kwargs

    nll = torch.empty(len(targets), dtype=torch.float64)
    logits = state.last_logits
    for i in range(len(targets)):
        nll[i] = -torch.log_softmax(logits.double(), -1)[int(targets[i])]
        if i + 1 < len(targets):
            logits = model(input_ids=targets[i].view(1, 1).to(model.device), **cache_kwargs(model, cache),
                           use_cache=True).logits[0, -1].float()
    return nll


# --------------------------------------------------------------------------------- bytes
def _side_ratio(strat: str, sp: float, D: int, itemsize: int) -> float:
    from mustafar.format import format_bytes

    if sp == 0.0:
        return 1.0
    # per-token exact (2:4 at 0.5 keeps D/2 == kept_count(D, 0.5)); per-channel / output-aware: the same mean budget
    return format_bytes(D, sp, _DTYPE_OF_ITEMSIZE[itemsize]) / (D * itemsize)


_DTYPE_OF_ITEMSIZE = {2: torch.float16, 4: torch.float32}


def format_bytes_ratio(spec: CacheSpec, head_dim: int, itemsize: int = 2) -> float:
    """Asymptotic cache bytes per token relative to dense (long context, window ignored).

    Bitmap format of docs/design.md: ``8*W + k*itemsize`` bytes per token vector (fp16 by default),
    as ``MustafarCache`` stores it for every compressed strategy, ThinK included (a ThinK-specific
    store of the kept channels only would need ``k*itemsize``). For per-channel / output-aware strategies the mean kept
    count per token vector is the same budget as per-token pruning (their per-row counts vary, so
    the fixed-stride layout would pad to the maximum: this is the ideal variable-stride figure).
    """
    return 0.5 * (_side_ratio(spec.k_strategy, spec.k_sparsity, head_dim, itemsize)
                  + _side_ratio(spec.v_strategy, spec.v_sparsity, head_dim, itemsize))
