"""Shared model-running core of the evaluation: one dense prefill, many pruned decodes.

Every evaluated configuration (a :class:`CacheSpec`) is applied the paper's way: the prompt is
prefilled with dense attention, then the cached K/V of all but the last ``local_window`` tokens
are pruned, and the answer is decoded from that cache. Because the prefill is dense, it is the
same for every configuration: :func:`prefill` runs it **once** per prompt (with a
``DynamicCache``; queries are captured when a query-driven strategy needs them) and
:func:`build_cache` replays its K/V into a fresh cache per configuration:

- ``impl="dense"``: a ``DynamicCache`` (the dense baseline).
- ``impl="mustafar"``: :class:`mustafar.cache.MustafarCache` with ``mode="compressed"`` (bitmap
  store, sparse decode attention) where the strategy has a compressed path (per-token magnitude,
  2:4) and ``mode="simulate"`` otherwise. Replaying = calling ``cache.update(k, v, layer)`` with the
  prefill's K/V, which is exactly what the model's own prefill call does (its prefill attention is
  dense); ``tests/test_eval.py`` checks replay == real prefill token for token.
- ``impl="offline"``: query-driven strategies (``output_aware``, ``think``) the cache cannot run
  (it never sees queries): the prompt's K/V are pruned here with the captured post-RoPE queries
  (all but the last ``local_window`` tokens), put in a ``DynamicCache``, and the generated tokens
  stay dense (a short answer adds few tokens).

Decoding is greedy.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

__all__ = ["CacheSpec", "PrefillState", "prefill", "build_cache", "greedy_decode", "format_bytes_ratio",
           "ByteTokenizer", "QUERY_STRATEGIES", "COMPRESSED_STRATEGIES"]

QUERY_STRATEGIES = ("output_aware", "think")
COMPRESSED_STRATEGIES = ("per_token_magnitude", "semi_structured_2_4")


@dataclass(frozen=True)
class CacheSpec:
    """One KV-cache configuration of the sweep.

    Parameters
    ----------
    k_strategy, v_strategy : str, keys of ``mustafar.pruning.STRATEGIES``.
    k_sparsity, v_sparsity : float in [0, 1).
    local_window : int, most recent tokens kept dense (paper: 32).
    k_granularity, v_granularity : ``"per_token"`` / ``"per_channel"``, only for ``output_aware``.
    """

    k_strategy: str = "per_token_magnitude"
    v_strategy: str = "per_token_magnitude"
    k_sparsity: float = 0.0
    v_sparsity: float = 0.0
    local_window: int = 32
    k_granularity: str = "per_token"
    v_granularity: str = "per_token"

    @property
    def is_dense(self) -> bool:
        return self.k_sparsity == 0.0 and self.v_sparsity == 0.0

    @property
    def impl(self) -> str:
        """``"dense"``, ``"mustafar"`` or ``"offline"`` (see the module docstring)."""
        if self.is_dense:
            return "dense"
        if self.k_strategy in QUERY_STRATEGIES or self.v_strategy in QUERY_STRATEGIES:
            return "offline"
        return "mustafar"

    @property
    def mode(self) -> str:
        """The cache mode used: ``"dense"``, ``"compressed"``, ``"simulate"`` or ``"offline"``."""
        impl = self.impl
        if impl != "mustafar":
            return impl
        ok = all(s in COMPRESSED_STRATEGIES or sp == 0.0
                 for s, sp in ((self.k_strategy, self.k_sparsity), (self.v_strategy, self.v_sparsity)))
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


_CAPTURE: dict | None = None
_CAPTURE_NAME = "mustafar_eval_capture"


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _CAPTURE is not None:
        _CAPTURE[module.layer_idx] = query.detach()
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


_REGISTERED = False


def _register_capture():
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(_CAPTURE_NAME, _capture_attention)
        AttentionMaskInterface.register(_CAPTURE_NAME, sdpa_mask)
        _REGISTERED = True


@contextlib.contextmanager
def _attn_impl(model, name: str):
    old = getattr(model.config, "_attn_implementation", "sdpa")
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


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

    global _CAPTURE
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got shape {tuple(input_ids.shape)}")
    cache = DynamicCache(config=model.config)
    ctx = contextlib.nullcontext()
    if capture_queries:
        _register_capture()
        _CAPTURE = {}
        ctx = _attn_impl(model, _CAPTURE_NAME)
    try:
        with ctx:
            out = model(input_ids=input_ids.to(model.device), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
        queries = [_CAPTURE[i] for i in range(len(cache.layers))] if capture_queries else None
    finally:
        _CAPTURE = None
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return PrefillState(keys, values, queries, out.logits[0, -1].float(), int(input_ids.shape[1]))


# --------------------------------------------------------------------------------- caches
def _offline_prune(x, q, k_full, sp, strat, gran, kind, window):
    from mustafar.pruning import prune

    if sp == 0.0:
        return x
    T = x.shape[2]
    n = max(0, T - window)
    if n == 0:
        return x
    kw = {}
    if strat == "output_aware":
        kw = dict(kind=kind, granularity=gran, q=q)
        if kind == "value":
            kw["k"] = k_full
    elif strat == "think":
        kw = dict(q=q, kind=kind)
    pruned = prune(x, sp, strat, **kw)
    out = x.clone()
    out[:, :, :n] = pruned[:, :, :n]  # [1, H_kv, T, D]; last `window` tokens stay dense
    return out


def build_cache(model, state: PrefillState, spec: CacheSpec, max_new_tokens: int = 64):
    """A fresh cache for ``spec`` holding the (pruned) prefill K/V of ``state``.

    Returns
    -------
    cache : transformers ``Cache``
    mode : str, ``spec.mode``
    """
    from transformers import DynamicCache

    impl = spec.impl
    if impl == "mustafar":
        from mustafar.cache import MustafarCache, MustafarConfig

        cfg = MustafarConfig(
            k_sparsity=spec.k_sparsity, v_sparsity=spec.v_sparsity,
            k_strategy=_strategy_for_cache(spec.k_strategy, spec.k_sparsity),
            v_strategy=_strategy_for_cache(spec.v_strategy, spec.v_sparsity),
            local_window=spec.local_window, mode=spec.mode)
        cache = MustafarCache(model, cfg, max_cache_len=state.n_tokens + max_new_tokens + 1)
        for i, (k, v) in enumerate(zip(state.keys, state.values)):
            cache.update(k, v, i)
        return cache, spec.mode
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(zip(state.keys, state.values)):
        if impl == "offline":
            q = state.queries[i] if state.queries is not None else None
            if q is None:
                raise ValueError(f"{spec.name} needs queries: prefill(..., capture_queries=True)")
            k2 = _offline_prune(k, q, k, spec.k_sparsity, spec.k_strategy, spec.k_granularity, "key", spec.local_window)
            v2 = _offline_prune(v, q, k, spec.v_sparsity, spec.v_strategy, spec.v_granularity, "value", spec.local_window)
            k, v = k2, v2
        cache.update(k.clone() if impl == "dense" else k, v.clone() if impl == "dense" else v, i)
    return cache, spec.mode


@torch.inference_mode()
def greedy_decode(model, cache, state: PrefillState, max_new_tokens: int, eos_ids: Sequence[int] = (),
                  stop=None) -> list[int]:
    """Greedy tokens after the prompt: the first from the prefill's logits, the rest through ``cache``.

    ``stop(tokens) -> bool`` may end generation early. EOS tokens are not included.
    """
    eos = set(int(e) for e in eos_ids if e is not None)
    nxt = int(state.last_logits.argmax())
    out: list[int] = []
    for step in range(max_new_tokens):
        if nxt in eos:
            break
        out.append(nxt)
        if step == max_new_tokens - 1 or (stop is not None and stop(out)):
            break
        logits = model(input_ids=torch.tensor([[nxt]], device=model.device), past_key_values=cache,
                       use_cache=True).logits
        nxt = int(logits[0, -1].argmax())
    return out


@torch.inference_mode()
def teacher_forced_nll(model, cache, state: PrefillState, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of ``targets [N]`` fed one at a time through ``cache`` after the prefill.

    ``nll[0]`` comes from the prefill's last logits; ``nll[i]`` from the decode step fed ``targets[i-1]``.
    """
    nll = torch.empty(len(targets), dtype=torch.float64)
    logits = state.last_logits
    for i in range(len(targets)):
        nll[i] = -torch.log_softmax(logits.double(), -1)[int(targets[i])]
        if i + 1 < len(targets):
            logits = model(input_ids=targets[i].view(1, 1).to(model.device), past_key_values=cache,
                           use_cache=True).logits[0, -1].float()
    return nll


# --------------------------------------------------------------------------------- bytes
def _side_ratio(strat: str, sp: float, D: int, itemsize: int) -> float:
    from mustafar.pruning import kept_count

    if sp == 0.0:
        return 1.0
    W = D // 64 if D % 64 == 0 else -(-D // 64)
    if strat == "think":  # whole channels dropped per head: no bitmap needed
        return kept_count(D, sp) / D
    if strat == "semi_structured_2_4":
        k = D // 2
    else:
        k = kept_count(D, sp)  # per-token exact; per-channel / output-aware: the same mean budget
    return (8 * W + k * itemsize) / (D * itemsize)


def format_bytes_ratio(spec: CacheSpec, head_dim: int, itemsize: int = 2) -> float:
    """Asymptotic cache bytes per token relative to dense (long context, window ignored).

    Bitmap format of docs/design.md: ``8*W + k*itemsize`` bytes per token vector (fp16 by default);
    ThinK stores the kept channels only. For per-channel / output-aware strategies the mean kept
    count per token vector is the same budget as per-token pruning (their per-row counts vary, so
    the fixed-stride layout would pad to the maximum: this is the ideal variable-stride figure).
    """
    return 0.5 * (_side_ratio(spec.k_strategy, spec.k_sparsity, head_dim, itemsize)
                  + _side_ratio(spec.v_strategy, spec.v_sparsity, head_dim, itemsize))
