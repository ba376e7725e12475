"""``MustafarConfig`` and ``MustafarCache``: a transformers ``Cache`` holding a pruned, bitmap-compressed KV cache.

Schedule (identical in both modes, so ``"simulate"`` is the exact dense twin of ``"compressed"``):

* Every layer keeps the most recent tokens dense (the *window*). Older tokens are pruned per token
  vector (K with ``k_strategy`` at ``k_sparsity``, V with ``v_strategy`` at ``v_sparsity``) and, in
  ``"compressed"`` mode, encoded in the bitmap format of ``docs/design.md``.
* A call with ``q_len > 1`` (the prompt, a second turn, chunked prefill) attends densely: it sees the
  past as stored (compressed rows decoded for that call only, the window as is) plus its own tokens
  unpruned. Afterwards everything but the last ``local_window`` tokens is pruned/compressed. For the
  first call (prefill) that is the paper's "dense attention over the prompt, then compress".
  After prefill, this path decodes the whole compressed part once per call: it is the slow path.
* A call with ``q_len == 1`` (decode) appends the token to the window; when the window then holds more
  than ``local_window + compress_chunk`` tokens, its ``compress_chunk`` oldest tokens are pruned and
  appended to the compressed store. Attention then runs over ``[compressed ; window]`` through
  :func:`mustafar.ops.sparse_decode` (compressed mode) or dense sdpa (simulate mode).

Default ``compress_chunk = 256`` follows the paper's kernel path (compress in chunks of 256); the
window therefore holds between ``local_window`` and ``local_window + compress_chunk`` dense tokens
during decode. ``compress_chunk = 1`` compresses every token as soon as it leaves the 32-token window.

Query-driven strategies (``output_aware``, ``think``; mustafar.pruning for the score formulas):

* The ``"mustafar"`` attention function hands each call's post-RoPE queries ``[B, H_q, q_len, D]``
  (with the mask and scale it used) back to the cache layer (:meth:`MustafarLayer.consume_queries`).
  A multi-token call is pruned after its dense attention, exactly as
  ``mustafar.prune(x, s, strategy, q=q, ...)`` on the call's K/V and queries would prune those rows
  (tests/test_cache.py checks this bit for bit at prefill): K output-aware scores ``|K| x`` the
  G-summed ``|Q|`` of the ``window`` (default 32) queries from the token's own position on; V
  output-aware scores ``|V| x`` the attention weight the token receives (causal / padding mask,
  softmax over every key the queries read, formed in query chunks of <= 2**24 scores), summed over
  queries and the G heads; ThinK keeps, per (sequence, KV head), the channels with the largest
  ``||Q_obs[:, c]|| * ||K[:, c]||`` over the last ``obs_window`` queries and the call's tail tokens.
* Tokens that stay in the window keep running sums: ``qacc`` (fp64 ``[B, H_kv, wcap, D]``, the
  G-summed ``|Q|`` of the queries received so far, at most ``window`` of them) and ``vacc`` (fp32
  ``[B, H_kv, wcap]``, attention received so far); each decode step adds its query. A decode-time
  chunk is scored from them when it is compressed, i.e. with the queries that arrived before (the
  query of the step that compresses it is not yet known). For K output-aware this is exactly the
  prefill formula whenever ``local_window >= window - 1`` (defaults 32/32). V output-aware sums the
  attention of every query from the token's arrival to its compression (at prefill: the queries of
  that call). In ``"compressed"`` mode the decode step's attention weights on the window come from a
  softmax over the dense window only (the compressed part's normaliser is not exposed by
  ``sparse_decode``): per query a common factor, which leaves per-token rankings unchanged (the
  only granularity compressed mode allows); ``"simulate"`` uses the full softmax.
* ThinK: the channel set is fixed at the last multi-token call (prefill) and reused for every later
  decode-time chunk, as ThinK does; a later multi-token call (second turn) recomputes it.
* Code that replays a prefill with ``cache.update`` (no attention call) passes the queries as
  ``cache.update(k, v, layer_idx, {"query_states": q})``.

Memory layout of one compressed layer (``B`` batch, ``H`` KV heads, ``W = D // 64``):
``k_bitmap``/``v_bitmap`` int64 ``[B, H, cap, W]``, ``k_values [B, H, cap, k_k]``,
``v_values [B, H, cap, k_v]``, dense window ``[B, H, <= local_window + compress_chunk + 1, D]`` (grown on demand
unless ``max_cache_len`` preallocates it) for K and V,
and an int64 ``[2]`` counter tensor. Appends write rows after the last used row; nothing stored is
rewritten. ``cap`` is ``max_cache_len`` when given; otherwise it grows geometrically (x2), and each
growth copies the used rows once into the new buffer (amortised O(1) per token, but a real copy:
pass ``max_cache_len`` to avoid it). ``cap`` is always rounded up to a multiple of 8 rows, so every
``(batch, head)`` slice of the store starts 16-byte aligned for any ``k`` (the CUDA kernels stage it
with 16-byte copies; an unaligned store falls back to element copies, several times slower).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer



def _layer_types(config) -> tuple[list[str], list[dict]]:
    """Per-layer attention type and cache-layer kwargs (the rule of transformers' DynamicCache, version-stable)."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        if getattr(config, "sliding_window", None) is not None:
            types = ["sliding_attention"] * n
        elif getattr(config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            types = ["full_attention"] * n
    types = list(types)[:n]
    if getattr(config, "kv_sharing_modes", None) is not None:
        types = ["shared_kv" if m == "reuse" else t for t, m in zip(types, config.kv_sharing_modes)]
    kw = [{"sliding_window": config.sliding_window} if t == "sliding_attention" else {} for t in types]
    return types, kw

from mustafar import ops
from mustafar.pruning import STRATEGIES, kept_count, prune, topk_mask
from mustafar.pruning._common import group_channel_mask
from mustafar.pruning.think import think_channel_scores

__all__ = ["MustafarConfig", "MustafarCache", "MustafarLayer", "MustafarSimulatedLayer"]

_MODES = ("compressed", "simulate")
# Strategies that keep a fixed number of values per token vector (what the fixed-stride format needs).
_FIXED_BUDGET = ("per_token_magnitude", "semi_structured_2_4", "think")  # + output_aware per_token
# Query-driven strategies: scored with the queries the "mustafar" attention function hands to the cache.
_NEED_QUERIES = ("output_aware", "think")
# Their options a MustafarConfig may set (q / k / attn are supplied by the cache).
_QUERY_KWARGS = {"output_aware": ("granularity", "window", "group_size", "kind"), "think": ("obs_window", "kind")}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# layer_idx -> True between a compressed decode-step `update` and the attention call that consumes it;
# lets mustafar.attention detect a model that transforms the keys in between (it would lose the store).
PENDING_DECODE: dict[int, bool] = {}


def _round8(n: int) -> int:
    """``n`` rounded up to a multiple of 8 (rows of the compressed store: 16-byte aligned slices)."""
    return -(-int(n) // 8) * 8


@dataclass
class MustafarConfig:
    """How a :class:`MustafarCache` prunes and stores K and V.

    Parameters
    ----------
    k_sparsity, v_sparsity : float in [0, 1)
        Fraction of each token vector pruned (``n = floor(s*D + 0.5)`` entries zeroed).
    k_strategy, v_strategy : str
        A key of :data:`mustafar.pruning.STRATEGIES`. Default ``"per_token_magnitude"`` (the paper).
        ``mode="compressed"`` needs a fixed kept count per token vector: ``per_token_magnitude`` or
        ``semi_structured_2_4`` (sparsity 0.5). Others (e.g. ``per_channel_magnitude``) need
        ``mode="simulate"``. Query-driven strategies (``output_aware``, ``think``) are not supported
        by the cache (it never sees the queries) and raise ``ValueError``.
    local_window : int >= 0
        Most recent tokens kept dense (paper: 32).
    compress_chunk : int >= 1
        During decode, tokens leave the window in chunks of this many (paper kernel path: 256).
    mode : ``"compressed"`` | ``"simulate"``
        ``"compressed"``: bitmap store + sparse decode attention. ``"simulate"``: dense tensors with
        pruned entries zeroed, same schedule, normal (sdpa) attention.
    k_strategy_kwargs, v_strategy_kwargs : dict
        Extra keyword arguments of the strategies (e.g. ``group_size`` of per-channel pruning).
        ``output_aware``: ``granularity`` (``"per_token"``/``"per_channel"``), ``window`` (queries summed
        per key, default 32), ``group_size``; ``kind`` is implied by the side. ``think``: ``obs_window``.
    """

    k_sparsity: float = 0.7
    v_sparsity: float = 0.7
    k_strategy: str = "per_token_magnitude"
    v_strategy: str = "per_token_magnitude"
    local_window: int = 32
    compress_chunk: int = 256
    mode: str = "compressed"
    k_strategy_kwargs: dict = field(default_factory=dict)
    v_strategy_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("k_sparsity", "v_sparsity"):
            s = getattr(self, name)
            if isinstance(s, bool) or not isinstance(s, Real) or not (0.0 <= float(s) < 1.0):
                raise ValueError(f"{name}={s!r} must be a number in [0, 1)")
            setattr(self, name, float(s))
        for name in ("local_window", "compress_chunk"):
            v = getattr(self, name)
            lo = 0 if name == "local_window" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}={v!r} must be an int >= {lo}")
        if self.mode not in _MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {_MODES}")
        for which in ("k", "v"):
            strat = getattr(self, f"{which}_strategy")
            kw = getattr(self, f"{which}_strategy_kwargs")
            if strat not in STRATEGIES:
                raise ValueError(f"{which}_strategy={strat!r} unknown; available: {sorted(STRATEGIES)}")
            if not isinstance(kw, dict):
                raise ValueError(f"{which}_strategy_kwargs={kw!r} must be a dict")
            if strat in _NEED_QUERIES:
                self._check_query_kwargs(which, strat, kw)
            if self.mode == "compressed" and not self._fixed_budget(which):
                gran = f" (granularity={kw.get('granularity')!r})" if strat == "output_aware" else ""
                raise ValueError(
                    f"{which}_strategy={strat!r}{gran} has no fixed kept count per token vector; "
                    f"mode='compressed' supports per_token_magnitude, semi_structured_2_4, think and "
                    f"output_aware with granularity='per_token'; use mode='simulate'"
                )
            if strat == "semi_structured_2_4" and getattr(self, f"{which}_sparsity") != 0.5:
                raise ValueError(
                    f"{which}_strategy='semi_structured_2_4' fixes sparsity at 0.5, got "
                    f"{which}_sparsity={getattr(self, f'{which}_sparsity')}"
                )

    def _check_query_kwargs(self, which: str, strat: str, kw: dict) -> None:
        kind = "key" if which == "k" else "value"
        allowed = _QUERY_KWARGS[strat]
        bad = sorted(set(kw) - set(allowed))
        if bad:
            raise ValueError(
                f"{which}_strategy_kwargs has option(s) {bad} that {strat!r} cannot take inside the cache "
                f"(the cache supplies the queries/attention itself); allowed: {list(allowed)}"
            )
        if kw.get("kind", kind) != kind:
            raise ValueError(f"{which}_strategy_kwargs kind={kw['kind']!r}: the {which.upper()} side is kind={kind!r}")
        if strat == "think" and which == "v":
            raise ValueError("v_strategy='think': ThinK prunes key channels only (query-driven); use it as k_strategy")
        if strat == "output_aware" and kw.get("granularity", "per_token") not in ("per_token", "per_channel"):
            raise ValueError(f"{which}_strategy_kwargs granularity={kw['granularity']!r} must be 'per_token' or "
                             "'per_channel'")
        for name in ("window", "group_size", "obs_window"):
            v = kw.get(name, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{which}_strategy_kwargs {name}={v!r} must be a positive int")

    def _fixed_budget(self, which: str) -> bool:
        strat = getattr(self, f"{which}_strategy")
        if strat == "output_aware":
            return getattr(self, f"{which}_strategy_kwargs").get("granularity", "per_token") == "per_token"
        return strat in _FIXED_BUDGET

    def needs_queries(self, which: str) -> bool:
        """Whether the ``which`` (``"k"``/``"v"``) side prunes with a query-driven strategy (sparsity > 0)."""
        return getattr(self, f"{which}_strategy") in _NEED_QUERIES and getattr(self, f"{which}_sparsity") > 0.0

    # -- helpers used by the layers
    def kept(self, which: str, head_dim: int) -> int:
        """Values stored per token vector of K (``which="k"``) or V in compressed mode."""
        strat = getattr(self, f"{which}_strategy")
        if strat == "semi_structured_2_4":
            return head_dim // 2
        return kept_count(head_dim, getattr(self, f"{which}_sparsity"))

    def prune_dense(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """Pruned copy of ``x [B, H, T, D]`` (pruned entries 0), as the simulate mode stores it."""
        s = getattr(self, f"{which}_sparsity")
        strat = getattr(self, f"{which}_strategy")
        if s == 0.0 and (strat == "per_token_magnitude" or strat in _NEED_QUERIES):
            return x
        return prune(x, s, strat, **getattr(self, f"{which}_strategy_kwargs"))

    def encode(self, which: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prune and encode ``x [B, H, T, D]`` -> ``bitmap [B, H, T, W]``, ``values [B, H, T, k]``."""
        strat = getattr(self, f"{which}_strategy")
        k = self.kept(which, x.shape[-1])
        x = x.contiguous()
        if strat == "per_token_magnitude" or strat in _NEED_QUERIES:  # query-driven: only reached at sparsity 0
            return ops.prune_encode_topk(x, k)
        _, mask = prune(x, getattr(self, f"{which}_sparsity"), strat, return_mask=True,
                        **getattr(self, f"{which}_strategy_kwargs"))
        return ops.encode_bitmap(x, mask, k)



# ---------------------------------------------------------------------------------------------------------------------
_RECEIVED_CHUNK_ELEMS = 1 << 24  # bound of one [B, H_q, chunk, T] fp32 score block in _attention_received


def _attention_received(query: torch.Tensor, key: torch.Tensor, mask, scaling: float, key_pos0: int,
                        ncols: int) -> torch.Tensor:
    """Attention weight the last ``ncols`` keys receive, summed over the queries and the G heads of each group.

    Parameters
    ----------
    query : ``[B, H_q, T_q, D]``; query ``j`` sits at the position of key column ``T_k - T_q + j``.
    key : ``[B, H_kv, T_k, D]`` every key the queries attend to (softmax denominator).
    mask : ``None`` (causal), int32 ``kv_start [B]`` (causal + positions ``< kv_start`` masked; key column
        ``c`` has position ``key_pos0 + c``) or a 4D sdpa mask ``[B|1, 1|H_q, T_q, >=T_k]`` (bool: True =
        attend, or additive float).
    scaling : softmax scale.

    Returns
    -------
    fp32 ``[B, H_kv, ncols]``. Scores are formed in chunks of queries so one block holds at most
    ``2**24`` elements; fully masked query rows contribute 0.
    """
    B, Hq, Tq, D = query.shape
    H, Tk = key.shape[1], key.shape[2]
    G = Hq // H
    kf = key.float().transpose(-1, -2)  # [B, H_kv, D, T_k]
    cols = torch.arange(Tk, device=key.device)
    out = torch.zeros(B, H, ncols, dtype=torch.float32, device=key.device)
    chunk = max(1, _RECEIVED_CHUNK_ELEMS // max(1, B * Hq * Tk))
    for j0 in range(0, Tq, chunk):
        j1 = min(Tq, j0 + chunk)
        c = j1 - j0
        qg = query[:, :, j0:j1].float().reshape(B, H, G * c, D)  # [B, H_kv, G*c, D]
        sc = (qg @ kf * scaling).view(B, H, G, c, Tk)  # [B, H_kv, G, c, T_k]
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            m = mask[:, :, j0:j1, :Tk].to(key.device)  # [B|1, 1|H_q, c, T_k]
            m = m[:, :, None] if m.shape[1] == 1 else m.reshape(m.shape[0], H, G, c, Tk)
            sc = sc.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else sc + m.float()
        else:
            qpos = torch.arange(j0, j1, device=key.device) + (Tk - Tq)  # [c]
            allowed = (cols[None, :] <= qpos[:, None])[None]  # [1, c, T_k]
            if isinstance(mask, torch.Tensor):  # kv_start [B]
                allowed = allowed & ((cols + key_pos0)[None, None, :] >= mask.to(key.device).long()[:, None, None])
            sc = sc.masked_fill(~allowed[:, None, None], float("-inf"))
        p = torch.softmax(sc, dim=-1).nan_to_num_(0.0)  # [B, H_kv, G, c, T_k]
        out += p.reshape(B, H, G * c, Tk).sum(2)[..., Tk - ncols:]
    return out


def _valid_keys(mask, tk: int):
    """``[B, T_k]`` bool: key columns the last query may read (a 4D sdpa mask), else ``None``."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    m = mask[:, 0, -1, :tk]  # [B|1, T_k]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


class _QueryState:
    """Query-driven scoring state of one layer (built only when a side uses ``output_aware`` / ``think``).

    The dense window rows ``0..n_w-1`` (cache positions ``n_c..n_c+n_w-1``) carry accumulators:

    * ``qacc`` fp64 ``[B, H_kv, wcap, D]`` (K output-aware): sum of the G-summed ``|Q|`` of the queries at
      positions ``t .. t+window-1`` that have arrived so far for row ``t``.
    * ``vacc`` fp32 ``[B, H_kv, wcap]`` (V output-aware): attention weight received so far, summed over
      queries and the G heads.
    * ``think_keep`` bool ``[B, H_kv, D]`` (K ThinK): the kept channels of the last multi-token call.
    """

    def __init__(self, cfg: MustafarConfig, head_dim: int):
        self.cfg = cfg
        self.head_dim = head_dim
        self.k_oa = cfg.needs_queries("k") and cfg.k_strategy == "output_aware"
        self.k_think = cfg.needs_queries("k") and cfg.k_strategy == "think"
        self.v_oa = cfg.needs_queries("v") and cfg.v_strategy == "output_aware"
        kk, vk = cfg.k_strategy_kwargs, cfg.v_strategy_kwargs
        self.k_window = kk.get("window", 32)
        self.obs_window = kk.get("obs_window", 32)
        self.qacc = self.vacc = self.think_keep = None

    def allocate(self, batch: int, heads: int, device) -> None:
        wcap = self.cfg.local_window + self.cfg.compress_chunk + 1
        d = self.head_dim
        if self.k_oa:
            self.qacc = torch.zeros(batch, heads, wcap, d, dtype=torch.float64, device=device)
        if self.v_oa:
            self.vacc = torch.zeros(batch, heads, wcap, dtype=torch.float32, device=device)
        self.think_keep = None

    def free(self) -> None:
        self.qacc = self.vacc = self.think_keep = None

    def tensors(self) -> dict:
        out = {}
        if self.qacc is not None:
            out["k_query_acc"] = self.qacc
        if self.vacc is not None:
            out["v_attn_acc"] = self.vacc
        if self.think_keep is not None:
            out["k_think_keep"] = self.think_keep
        return out

    # -- masks
    def _select(self, which: str, score: torch.Tensor) -> torch.Tensor:
        """Keep-mask ``[B, H, n, D]`` from a score of the same shape (per-token or per-channel-group rule)."""
        kw = getattr(self.cfg, f"{which}_strategy_kwargs")
        s = getattr(self.cfg, f"{which}_sparsity")
        if kw.get("granularity", "per_token") == "per_token":
            return topk_mask(score, kept_count(score.shape[-1], s))
        return group_channel_mask(score, s, kw.get("group_size", 32))

    def _think_mask(self, n: int) -> torch.Tensor:
        if self.think_keep is None:
            raise RuntimeError("ThinK channel set not computed: the cache saw no multi-token call with queries "
                               "(a one-token prompt); prefill at least two tokens")
        b, h, d = self.think_keep.shape
        return self.think_keep[:, :, None, :].expand(b, h, n, d)

    def masks(self, k_rows, v_rows, qsum, asum):
        """Keep-masks of ``k_rows, v_rows [B, H, n, D]`` (``None`` for a side without queries)."""
        km = vm = None
        n = k_rows.shape[2]
        if self.k_oa:
            km = self._select("k", k_rows.abs().float() * qsum.float())
        elif self.k_think:
            km = self._think_mask(n)
        if self.v_oa:
            vm = self._select("v", v_rows.abs().float() * asum.float()[..., None])
        return km, vm

    # -- multi-token call
    def bulk(self, tail_k, tail_v, n_old, query, key_full, mask, scaling, n_comp):
        """Masks of the first ``n_comp`` tail rows; keeps the accumulators of the rest.

        ``tail_k, tail_v [B, H, t, D]`` = ``[old window rows (n_old) ; this call's tokens]``; ``query
        [B, H_q, t - n_old, D]`` this call's queries; ``key_full [B, H, T_k, D]`` every key they attended
        (its last ``t`` columns are the tail).
        """
        B, H, t, D = tail_k.shape
        qn = query.shape[2]
        qsum = asum = None
        if self.k_oa:
            w = self.k_window
            G = query.shape[1] // H
            # same arithmetic as mustafar.pruning.output_aware.key_scores
            qa = query.abs().to(torch.float64).reshape(B, H, G, qn, D).sum(2)  # [B, H, q, D]
            cs = torch.nn.functional.pad(qa.cumsum(2), (0, 0, 1, 0))  # [B, H, q+1, D]
            j = torch.arange(qn, device=query.device)
            new = cs[:, :, torch.clamp(j + w, max=qn)] - cs[:, :, j]  # [B, H, q, D]
            i = torch.arange(n_old, device=query.device)
            old = cs[:, :, torch.clamp(i - n_old + w, min=0, max=qn)] - cs[:, :, :1]  # [B, H, n_old, D]
            qsum = torch.cat([self.qacc[:, :, :n_old] + old, new], dim=2)  # [B, H, t, D]
        if self.k_think:
            kt, qt = tail_k, query
            valid = _valid_keys(mask, key_full.shape[2])  # [B, T_k] bool or None (no padding info)
            if valid is not None:  # padding tokens' keys / queries do not vote
                kt = tail_k * valid[:, None, -t:, None].to(tail_k.dtype)
                qt = query * valid[:, None, -qn:, None].to(query.dtype)
            sc = think_channel_scores(kt, qt, self.obs_window)  # [B, H, D]
            self.think_keep = topk_mask(sc, kept_count(D, self.cfg.k_sparsity))
        if self.v_oa:
            asum = _attention_received(query, key_full, mask, scaling, 0, t)  # [B, H, t]
            asum[:, :, :n_old] += self.vacc[:, :, :n_old]
        km, vm = self.masks(tail_k[:, :, :n_comp], tail_v[:, :, :n_comp],
                            None if qsum is None else qsum[:, :, :n_comp],
                            None if asum is None else asum[:, :, :n_comp])
        rest = t - n_comp
        if self.k_oa:
            self.qacc[:, :, :rest] = qsum[:, :, n_comp:]
            self.qacc[:, :, rest:] = 0
        if self.v_oa:
            self.vacc[:, :, :rest] = asum[:, :, n_comp:]
            self.vacc[:, :, rest:] = 0
        return km, vm

    # -- decode step
    def observe(self, query, key, mask, scaling, key_pos0, n_c, n_w) -> None:
        """Add one decode query ``[B, H_q, 1, D]`` (position ``n_c + n_w - 1``) to the window accumulators.

        ``key [B, H, T_k, D]`` are the keys the attention read, starting at position ``key_pos0`` (the
        full sequence, or only the dense window in the compressed fast path).
        """
        if self.k_oa:
            B, H = key.shape[:2]
            qa = query.abs().to(torch.float64).reshape(B, H, -1, self.head_dim).sum(2)  # [B, H, D]
            lo = max(0, n_w - self.k_window)
            self.qacc[:, :, lo:n_w] += qa[:, :, None]
        if self.v_oa:
            self.vacc[:, :, :n_w] += _attention_received(query, key, mask, scaling, key_pos0, n_w)

    def shift(self, n: int, n_w: int) -> None:
        """Drop the first ``n`` window rows' accumulators (they were compressed)."""
        for acc in (self.qacc, self.vacc):
            if acc is not None:
                acc[:, :, : n_w - n] = acc[:, :, n:n_w].clone()
                acc[:, :, n_w - n :] = 0  # invariant: rows >= n_w are 0 (a new window row starts empty)

# ---------------------------------------------------------------------------------------------------------------------
class _DecodeContext:
    """What the ``"mustafar"`` attention function needs for one decode step of one layer."""

    __slots__ = ("k_bitmap", "k_values", "v_bitmap", "v_values", "k_window", "v_window", "head_dim")

    def __init__(self, k_bitmap, k_values, v_bitmap, v_values, k_window, v_window, head_dim):
        self.k_bitmap, self.k_values = k_bitmap, k_values
        self.v_bitmap, self.v_values = v_bitmap, v_values
        self.k_window, self.v_window = k_window, v_window
        self.head_dim = head_dim

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompressed ``[compressed ; window]`` K and V ``[B, H, T, D]`` (slow path only)."""
        k = torch.cat([ops.decode_bitmap(self.k_bitmap, self.k_values, self.head_dim), self.k_window], dim=2)
        v = torch.cat([ops.decode_bitmap(self.v_bitmap, self.v_values, self.head_dim), self.v_window], dim=2)
        return k, v


class _MustafarLayerBase(CacheLayerMixin):
    """Schedule shared by both modes; subclasses implement the storage."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cfg: MustafarConfig, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 max_cache_len: int | None = None, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.max_cache_len = max_cache_len
        self.max_positions = max_positions  # uniform sliding-window models: the window must not be exceeded
        self.n_c = 0  # tokens pruned (compressed)
        self.n_w = 0  # tokens in the dense window
        self.counts: torch.Tensor | None = None  # int64 [2] = (n_c, n_w), the on-device bookkeeping
        # query-driven strategies: scoring state, and a multi-token call's K/V awaiting its queries
        self._qs = _QueryState(cfg, head_dim) if (cfg.needs_queries("k") or cfg.needs_queries("v")) else None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch_size = key_states.shape[0]
        self.counts = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._allocate(key_states.shape[0], key_states.device)
        if self._qs is not None:
            self._qs.allocate(key_states.shape[0], self.num_kv_heads, key_states.device)
        self.is_initialized = True

    def _check(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(
                f"key/value states must be [B, H_kv, T, D] of equal shape, got {tuple(key_states.shape)} "
                f"and {tuple(value_states.shape)}"
            )
        b, h, _, d = key_states.shape
        if h != self.num_kv_heads or d != self.head_dim:
            raise ValueError(
                f"this MustafarCache was built for H_kv={self.num_kv_heads}, head_dim={self.head_dim}; got "
                f"H_kv={h}, head_dim={d} (a cache cannot be reused across models of another shape)"
            )
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise ValueError(
                f"this MustafarCache was built for dtype {self.dtype}; got key/value dtype "
                f"{key_states.dtype}/{value_states.dtype}"
            )
        if self.is_initialized:
            if b != self.batch_size:
                raise ValueError(f"batch size {b} != the cache's batch size {self.batch_size}; call cache.reset()")
            if key_states.device != self.device:
                raise ValueError(f"key states on {key_states.device}, cache on {self.device}")
        if self.max_positions is not None and self.get_seq_length() + key_states.shape[2] > self.max_positions:
            raise ValueError(
                f"sequence length {self.get_seq_length() + key_states.shape[2]} exceeds the model's sliding window "
                f"{self.max_positions}: MustafarCache supports uniform sliding-window models only within the window"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Add ``key_states, value_states [B, H_kv, q_len, D]``; return the K/V attention should read.

        Query-driven strategies: a multi-token call's pruning waits for its queries, which the
        ``"mustafar"`` attention function hands over (:meth:`consume_queries`). Code that calls
        ``update`` without running attention (e.g. replaying a captured prefill) passes them instead as
        ``cache_kwargs={"query_states": q}`` (``q [B, H_q, q_len, D]`` post-RoPE): the tokens are pruned
        at once, with causal attention over ``[past ; these tokens]`` for value scores.
        """
        if self._pending is not None:
            raise RuntimeError(
                "MustafarCache layer: the previous multi-token call never received its queries (query-driven "
                f"k_strategy={self.cfg.k_strategy!r} / v_strategy={self.cfg.v_strategy!r}); run attention through "
                "the 'mustafar' attention implementation or pass cache_kwargs={'query_states': q} to update()"
            )
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q_len = key_states.shape[2]
        cfg = self.cfg
        if q_len == 1:
            self._append_window(key_states, value_states)
            if self.n_w > cfg.local_window + cfg.compress_chunk:
                self._compress_window_head(cfg.compress_chunk)
            out = self._decode_view()
            if self._qs is not None:
                out = (self._tag(out[0]), out[1])
        else:
            out = self._dense_with(key_states, value_states)
            if self._qs is None:
                # everything but the last `local_window` tokens leaves the window
                self._append_bulk(key_states, value_states)
            else:
                ck = kwargs.get("cache_kwargs", args[0] if args else None)
                q = ck.get("query_states") if isinstance(ck, dict) else None
                self._pending = (key_states, value_states)
                if q is not None:
                    self.consume_queries(q, out[0], None, None)
                else:
                    out = (self._tag(out[0]), out[1])
        self.counts[0] = self.n_c
        self.counts[1] = self.n_w
        return out

    def _tag(self, keys: torch.Tensor) -> torch.Tensor:
        """A fresh view of ``keys`` carrying this layer, for the attention function to hand the queries back."""
        ctx = getattr(keys, "_mustafar_ctx", None)
        keys = keys.view_as(keys)
        if ctx is not None:
            keys._mustafar_ctx = ctx
        keys._mustafar_layer = self
        return keys

    def consume_queries(self, query: torch.Tensor, key: torch.Tensor, attention_mask=None,
                        scaling: float | None = None, key_pos0: int | None = None) -> None:
        """Receive the queries of the call that just ran (called by :mod:`mustafar.attention`).

        Parameters
        ----------
        query : ``[B, H_q, q_len, D]`` post-RoPE queries of this call.
        key : ``[B, H_kv, T_k, D]`` the keys attention read: the whole sequence (multi-token call, slow
            path, simulate mode), or only the dense window (compressed decode fast path).
        attention_mask : ``None`` | int32 ``kv_start [B]`` | 4D sdpa mask, as given to attention.
        scaling : softmax scale (default ``D**-0.5``).
        key_pos0 : cache position of ``key``'s first row (default: ``get_seq_length() - T_k``).
        """
        if scaling is None:
            scaling = self.head_dim ** -0.5
        b, h = key.shape[:2]
        if (query.dim() != 4 or query.shape[0] != b or query.shape[1] % h or query.shape[-1] != self.head_dim):
            raise ValueError(f"query_states shape {tuple(query.shape)} does not fit keys {tuple(key.shape)} "
                             f"(expected [B={b}, H_q (multiple of {h}), q_len, D={self.head_dim}])")
        if self._pending is not None:
            k, v = self._pending
            if query.shape[2] != k.shape[2]:
                raise ValueError(f"query_states has q_len={query.shape[2]}, the pending call added {k.shape[2]} tokens")
            self._pending = None
            wk, wv = self._window_rows()
            tail_k = torch.cat([wk, k], dim=2)  # [B, H, n_w + q, D]
            tail_v = torch.cat([wv, v], dim=2)
            n_comp = max(0, tail_k.shape[2] - self.cfg.local_window)
            km, vm = self._qs.bulk(tail_k, tail_v, self.n_w, query, key, attention_mask, scaling, n_comp)
            self._append_bulk(k, v, km, vm)
            self.counts[0] = self.n_c
            self.counts[1] = self.n_w
        elif query.shape[2] == 1:
            if key_pos0 is None:
                key_pos0 = self.get_seq_length() - key.shape[2]
            self._qs.observe(query, key, attention_mask, scaling, key_pos0, self.n_c, self.n_w)

    def _chunk_masks(self, n: int):
        """Keep-masks of the ``n`` oldest window rows (query-driven sides; ``None`` otherwise); shifts the state."""
        if self._qs is None:
            return None, None
        wk, wv = self._window_rows()
        qs = self._qs
        km, vm = qs.masks(wk[:, :, :n], wv[:, :, :n], None if qs.qacc is None else qs.qacc[:, :, :n],
                          None if qs.vacc is None else qs.vacc[:, :, :n])
        qs.shift(n, self.n_w)
        return km, vm

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.n_c + self.n_w + (self._pending[0].shape[2] if self._pending is not None else 0)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.n_c = self.n_w = 0
        self.is_initialized = False
        self.counts = None
        self._pending = None
        if self._qs is not None:
            self._qs.free()
        self._free()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MustafarCache cannot be cropped (pruned tokens cannot be restored)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("MustafarCache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("MustafarCache does not support batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("MustafarCache does not support batch_select_indices")

    def offload(self):
        raise NotImplementedError("MustafarCache does not support offloading")

    def prefetch(self):
        pass

    # -- capacity helper
    def _new_capacity(self, current: int, needed: int) -> int:
        if self.max_cache_len is not None and needed <= self.max_cache_len:
            return max(_round8(self.max_cache_len), current)
        return _round8(max(needed, 2 * current, 64))

    # -- storage API of the subclasses
    def _allocate(self, batch: int, device) -> None: ...
    def _free(self) -> None: ...
    def _append_window(self, k, v) -> None: ...
    def _compress_window_head(self, n: int) -> None: ...
    def _decode_view(self): ...
    def _dense_with(self, k, v): ...
    def _append_bulk(self, k, v, km=None, vm=None) -> None: ...
    def _window_rows(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer holds, by role."""
        return {}


class MustafarLayer(_MustafarLayerBase):
    """Compressed layer: bitmap store ``[B, H, cap, *]`` + dense window ``[B, H, <= local_window + compress_chunk + 1, D]``."""

    def _allocate(self, batch, device):
        d, h = self.head_dim, self.num_kv_heads
        self.W = d // 64
        self.kk = self.cfg.kept("k", d)
        self.kv = self.cfg.kept("v", d)
        cap = _round8(self.max_cache_len or 0)
        self.cap = cap
        self.k_bitmap = torch.zeros(batch, h, cap, self.W, dtype=torch.int64, device=device)
        self.v_bitmap = torch.zeros(batch, h, cap, self.W, dtype=torch.int64, device=device)
        self.k_vals = torch.zeros(batch, h, cap, self.kk, dtype=self.dtype, device=device)
        self.v_vals = torch.zeros(batch, h, cap, self.kv, dtype=self.dtype, device=device)
        # The dense window holds at most local_window + compress_chunk + 1 rows. With max_cache_len it is
        # preallocated at that size; otherwise it starts at local_window + 1 rows and doubles up to it
        # (a copy of at most a few hundred window rows, never of the compressed store), so a short
        # conversation does not pay for a 289-row buffer per layer.
        self.wcap = self.cfg.local_window + self.cfg.compress_chunk + 1
        w0 = self.wcap if self.max_cache_len else min(self.wcap, self.cfg.local_window + 1)
        self.k_win = torch.zeros(batch, h, w0, d, dtype=self.dtype, device=device)
        self.v_win = torch.zeros(batch, h, w0, d, dtype=self.dtype, device=device)
        self._sync_kv()

    def _grow_window(self, needed: int):
        """Make the window buffers hold ``needed`` rows (doubling, capped at ``wcap``; copies used rows)."""
        cur = self.k_win.shape[2]
        if needed <= cur:
            return
        if needed > self.wcap:
            raise RuntimeError(f"mustafar: window of {needed} rows exceeds its capacity {self.wcap} (internal error)")
        cap = min(self.wcap, max(needed, 2 * cur))
        for name in ("k_win", "v_win"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], old.shape[1], cap, old.shape[3])  # [B, H, cap, D]
            new[:, :, : self.n_w] = old[:, :, : self.n_w]
            setattr(self, name, new)

    def _free(self):
        for n in ("k_bitmap", "v_bitmap", "k_vals", "v_vals", "k_win", "v_win"):
            setattr(self, n, None)
        self.keys = self.values = None

    def _sync_kv(self):
        # `keys`/`values` (the CacheLayerMixin fields) show the dense window, for code that peeks at them.
        self.keys = self.k_win[:, :, : self.n_w]
        self.values = self.v_win[:, :, : self.n_w]

    def tensors(self):
        if not self.is_initialized:
            return {}
        return {"k_bitmap": self.k_bitmap, "v_bitmap": self.v_bitmap, "k_values": self.k_vals,
                "v_values": self.v_vals, "k_window": self.k_win, "v_window": self.v_win, "counts": self.counts,
                **(self._qs.tensors() if self._qs is not None else {})}

    def _reserve(self, n_new: int):
        """Make room for ``n_new`` more compressed rows (geometric growth copies the used rows once)."""
        needed = self.n_c + n_new
        if needed <= self.cap:
            return
        cap = self._new_capacity(self.cap, needed)
        b, h = self.k_bitmap.shape[:2]
        for name, width, dt in (("k_bitmap", self.W, torch.int64), ("v_bitmap", self.W, torch.int64),
                                ("k_vals", self.kk, self.dtype), ("v_vals", self.kv, self.dtype)):
            old = getattr(self, name)
            new = torch.zeros(b, h, cap, width, dtype=dt, device=old.device)  # [B, H, cap, W|k]
            new[:, :, : self.n_c] = old[:, :, : self.n_c]
            setattr(self, name, new)
        self.cap = cap

    def _store(self, k: torch.Tensor, v: torch.Tensor, km=None, vm=None):
        """Prune + encode ``k, v [B, H, n, D]`` (with keep-masks ``km``/``vm`` where given) after the last used row."""
        n = k.shape[2]
        if n == 0:
            return
        self._reserve(n)
        kb, kvals = self.cfg.encode("k", k) if km is None else ops.encode_bitmap(k.contiguous(), km, self.kk)
        vb, vvals = self.cfg.encode("v", v) if vm is None else ops.encode_bitmap(v.contiguous(), vm, self.kv)
        sl = slice(self.n_c, self.n_c + n)
        self.k_bitmap[:, :, sl] = kb
        self.k_vals[:, :, sl] = kvals
        self.v_bitmap[:, :, sl] = vb
        self.v_vals[:, :, sl] = vvals
        self.n_c += n

    def _append_window(self, k, v):
        self._grow_window(self.n_w + 1)
        self.k_win[:, :, self.n_w : self.n_w + 1] = k
        self.v_win[:, :, self.n_w : self.n_w + 1] = v
        self.n_w += 1
        self._sync_kv()

    def _window_rows(self):
        return self.k_win[:, :, : self.n_w], self.v_win[:, :, : self.n_w]

    def _compress_window_head(self, n):
        km, vm = self._chunk_masks(n)
        self._store(self.k_win[:, :, :n], self.v_win[:, :, :n], km, vm)
        rest = self.n_w - n
        # shift the remaining (<= local_window + 1) window rows to the front: a small copy
        self.k_win[:, :, :rest] = self.k_win[:, :, n : self.n_w].clone()
        self.v_win[:, :, :rest] = self.v_win[:, :, n : self.n_w].clone()
        self.n_w = rest
        self._sync_kv()

    def _decode_view(self):
        ctx = _DecodeContext(
            self.k_bitmap[:, :, : self.n_c], self.k_vals[:, :, : self.n_c],
            self.v_bitmap[:, :, : self.n_c], self.v_vals[:, :, : self.n_c],
            self.k_win[:, :, : self.n_w], self.v_win[:, :, : self.n_w], self.head_dim,
        )
        keys, values = ctx.k_window.view_as(ctx.k_window), ctx.v_window.view_as(ctx.v_window)
        keys._mustafar_ctx = ctx  # read by mustafar.attention; fresh view object each step
        return keys, values

    def _past_dense(self):
        d = self.head_dim
        pk = ops.decode_bitmap(self.k_bitmap[:, :, : self.n_c], self.k_vals[:, :, : self.n_c], d)
        pv = ops.decode_bitmap(self.v_bitmap[:, :, : self.n_c], self.v_vals[:, :, : self.n_c], d)
        return pk, pv

    def _dense_with(self, k, v):
        if self.n_c == 0 and self.n_w == 0:
            return k, v
        pk, pv = self._past_dense() if self.n_c else (k[:, :, :0], v[:, :, :0])
        return (torch.cat([pk, self.k_win[:, :, : self.n_w], k], dim=2),
                torch.cat([pv, self.v_win[:, :, : self.n_w], v], dim=2))

    def _append_bulk(self, k, v, km=None, vm=None):
        lw = self.cfg.local_window
        tail_k = torch.cat([self.k_win[:, :, : self.n_w], k], dim=2)  # [B, H, n_w + q, D]
        tail_v = torch.cat([self.v_win[:, :, : self.n_w], v], dim=2)
        t = tail_k.shape[2]
        n_comp = max(0, t - lw)
        self._store(tail_k[:, :, :n_comp], tail_v[:, :, :n_comp], km, vm)
        rest = t - n_comp
        self._grow_window(rest)
        self.k_win[:, :, :rest] = tail_k[:, :, n_comp:]
        self.v_win[:, :, :rest] = tail_v[:, :, n_comp:]
        self.n_w = rest
        self._sync_kv()


class MustafarSimulatedLayer(_MustafarLayerBase):
    """Simulate layer: dense ``[B, H, cap, D]`` K/V where tokens outside the window are pruned (zeroed) in place."""

    def _allocate(self, batch, device):
        d, h = self.head_dim, self.num_kv_heads
        self.cap = _round8(self.max_cache_len or 0)
        self.k_buf = torch.zeros(batch, h, self.cap, d, dtype=self.dtype, device=device)
        self.v_buf = torch.zeros(batch, h, self.cap, d, dtype=self.dtype, device=device)
        self._sync_kv()

    def _free(self):
        self.k_buf = self.v_buf = None
        self.keys = self.values = None

    def _sync_kv(self):
        n = self.n_c + self.n_w
        self.keys = self.k_buf[:, :, :n]
        self.values = self.v_buf[:, :, :n]

    def tensors(self):
        if not self.is_initialized:
            return {}
        return {"k_dense": self.k_buf, "v_dense": self.v_buf, "counts": self.counts,
                **(self._qs.tensors() if self._qs is not None else {})}

    def _reserve(self, n_new):
        n = self.n_c + self.n_w
        if n + n_new <= self.cap:
            return
        cap = self._new_capacity(self.cap, n + n_new)
        for name in ("k_buf", "v_buf"):
            old = getattr(self, name)
            new = torch.zeros(*old.shape[:2], cap, old.shape[3], dtype=old.dtype, device=old.device)
            new[:, :, :n] = old[:, :, :n]
            setattr(self, name, new)
        self.cap = cap

    def _prune_rows(self, start, n, km=None, vm=None):
        if n <= 0:
            return
        sl = slice(start, start + n)
        zero = torch.zeros((), dtype=self.dtype, device=self.k_buf.device)
        for buf, which, m in ((self.k_buf, "k", km), (self.v_buf, "v", vm)):
            rows = buf[:, :, sl].clone()
            buf[:, :, sl] = self.cfg.prune_dense(which, rows) if m is None else torch.where(m, rows, zero)

    def _window_rows(self):
        sl = slice(self.n_c, self.n_c + self.n_w)
        return self.k_buf[:, :, sl], self.v_buf[:, :, sl]

    def _append_window(self, k, v):
        self._reserve(1)
        n = self.n_c + self.n_w
        self.k_buf[:, :, n : n + 1] = k
        self.v_buf[:, :, n : n + 1] = v
        self.n_w += 1
        self._sync_kv()

    def _compress_window_head(self, n):
        km, vm = self._chunk_masks(n)
        self._prune_rows(self.n_c, n, km, vm)
        self.n_c += n
        self.n_w -= n

    def _decode_view(self):
        self._sync_kv()
        return self.keys, self.values

    def _dense_with(self, k, v):
        n = self.n_c + self.n_w
        if n == 0:
            return k, v
        return torch.cat([self.k_buf[:, :, :n], k], dim=2), torch.cat([self.v_buf[:, :, :n], v], dim=2)

    def _append_bulk(self, k, v, km=None, vm=None):
        q = k.shape[2]
        self._reserve(q)
        n = self.n_c + self.n_w
        self.k_buf[:, :, n : n + q] = k
        self.v_buf[:, :, n : n + q] = v
        t = self.n_w + q
        n_comp = max(0, t - self.cfg.local_window)
        self._prune_rows(self.n_c, n_comp, km, vm)
        self.n_c += n_comp
        self.n_w = t - n_comp
        self._sync_kv()


# ---------------------------------------------------------------------------------------------------------------------
def _model_geometry(model) -> dict:
    """Validate that ``model`` has a standard per-token KV cache MustafarCache can serve; return its geometry."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    cfg = model.config.get_text_config(decoder=True)
    for attr in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim"):
        if getattr(cfg, attr, None) is not None:
            raise ValueError(
                f"model type {cfg.model_type!r} uses latent/compressed attention ({attr}); MustafarCache needs a "
                "standard per-head K/V cache"
            )
    if getattr(cfg, "v_head_dim", None) not in (None, getattr(cfg, "head_dim", None)):
        raise ValueError(f"model type {cfg.model_type!r} has v_head_dim != head_dim; not supported")
    try:
        layer_types, layer_kwargs = _layer_types(cfg)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot read the layer structure of model type {cfg.model_type!r}: {exc}") from None
    bad = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if bad:
        raise ValueError(
            f"model type {cfg.model_type!r} has layers of type {bad}; MustafarCache serves only attention layers "
            "with a standard KV cache (no state-space / linear-attention / shared or indexed caches)"
        )
    n_heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // n_heads if hidden and n_heads else None)
    if head_dim is None:
        raise ValueError(f"model type {cfg.model_type!r}: cannot determine head_dim")
    if head_dim % 64 != 0:
        raise ValueError(f"head_dim={head_dim} is not a multiple of 64; the bitmap format needs D in (64, 128, 256, ...)")
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    dtype = model.dtype
    if dtype not in _DTYPES:
        raise ValueError(f"model dtype {dtype} not supported: expected float16, bfloat16 or float32")
    return dict(layer_types=layer_types, layer_kwargs=layer_kwargs, head_dim=head_dim, num_kv_heads=n_kv,
                dtype=dtype, text_config=cfg)


class MustafarCache(Cache):
    """A transformers ``Cache`` that prunes and (in ``"compressed"`` mode) bitmap-encodes K and V.

    ``MustafarCache(model, cfg)`` validates the model, builds one layer per decoder layer and switches
    the model to the ``"mustafar"`` attention implementation (registered by :mod:`mustafar.attention`;
    it runs sdpa for every call it does not handle itself, so the model keeps working with other caches).

    Layers: ``full_attention`` -> :class:`MustafarLayer` (compressed) or :class:`MustafarSimulatedLayer`;
    ``sliding_attention`` in a hybrid model (Gemma 3) -> transformers' ``DynamicSlidingWindowLayer``
    (dense, small by construction). A model whose every layer is sliding (Mistral-style) gets Mustafar
    layers and raises once the sequence would exceed its sliding window.

    Parameters
    ----------
    model : transformers ``PreTrainedModel`` (decoder-only, per-head K/V, head_dim multiple of 64,
        fp16/bf16/fp32).
    config : :class:`MustafarConfig` (default: paper defaults, K=V=70%).
    max_cache_len : optional int, preallocate the compressed store for this many tokens per layer
        (otherwise it grows geometrically, copying the used rows at each growth).
    """

    def __init__(self, model, config: MustafarConfig | None = None, *, max_cache_len: int | None = None):
        import mustafar.attention as _attn

        if config is None:
            config = MustafarConfig()
        if not isinstance(config, MustafarConfig):
            raise ValueError(f"config must be a MustafarConfig, got {type(config).__name__}")
        if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int)
                                          or max_cache_len < 1):
            raise ValueError(f"max_cache_len={max_cache_len!r} must be a positive int or None")
        geo = _model_geometry(model)
        self.config = config
        self.head_dim = geo["head_dim"]
        self.num_kv_heads = geo["num_kv_heads"]
        self.dtype = geo["dtype"]
        self.model_type = geo["text_config"].model_type
        types = geo["layer_types"]
        all_sliding = all(t == "sliding_attention" for t in types)
        layer_cls = MustafarLayer if config.mode == "compressed" else MustafarSimulatedLayer
        layers = []
        for t, kw in zip(types, geo["layer_kwargs"]):
            if t == "sliding_attention" and not all_sliding:
                layers.append(DynamicSlidingWindowLayer(**kw))
            else:
                layers.append(layer_cls(config, self.num_kv_heads, self.head_dim, self.dtype, max_cache_len,
                                        max_positions=kw.get("sliding_window") if t == "sliding_attention" else None))
        super().__init__(layers=layers)
        _attn.prepare_model(model)

    # -- Cache API
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"layer_idx={layer_idx} but this MustafarCache has {len(self.layers)} layers (built for another model?)"
            )
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if getattr(keys, "_mustafar_ctx", None) is not None:
            PENDING_DECODE[layer_idx] = True
        return keys, values

    # -- accounting
    def _layer_tensors(self):
        for i, layer in enumerate(self.layers):
            if isinstance(layer, _MustafarLayerBase):
                yield i, layer, layer.tensors()
            else:
                ts = {}
                if getattr(layer, "is_initialized", False) and layer.keys is not None:
                    ts = {"k_dense": layer.keys, "v_dense": layer.values}
                yield i, layer, ts

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (buffers at capacity, windows, counters)."""
        return sum(t.nbytes for _, _, ts in self._layer_tensors() for t in ts.values())

    def dense_nbytes(self) -> int:
        """Bytes a ``DynamicCache`` would hold for the same tokens (sliding layers: what they hold now)."""
        total = 0
        for _, layer, ts in self._layer_tensors():
            if isinstance(layer, _MustafarLayerBase):
                if layer.is_initialized:
                    n = layer.get_seq_length()
                    total += 2 * layer.batch_size * layer.num_kv_heads * n * layer.head_dim * layer.dtype.itemsize
            else:
                total += sum(t.nbytes for t in ts.values())
        return total

    def breakdown(self) -> dict:
        """Bytes by role.

        Returns
        -------
        dict with ``payload`` (stored values, at capacity), ``bitmaps`` (at capacity), ``payload_used`` /
        ``bitmaps_used`` (rows holding tokens), ``window`` (dense window buffers at capacity), ``dense``
        (simulate buffers and dense sliding layers), ``bookkeeping`` (counters), ``total`` (== nbytes()),
        ``dense_equivalent`` (== dense_nbytes()), ``compressed_tokens``, ``window_tokens``.
        """
        out = dict(payload=0, bitmaps=0, payload_used=0, bitmaps_used=0, window=0, dense=0, bookkeeping=0,
                   compressed_tokens=0, window_tokens=0)
        for _, layer, ts in self._layer_tensors():
            for name, t in ts.items():
                if name.endswith("_values"):
                    out["payload"] += t.nbytes
                    out["payload_used"] += t[:, :, : layer.n_c].nbytes if t.shape[2] else 0
                elif name.endswith("_bitmap"):
                    out["bitmaps"] += t.nbytes
                    out["bitmaps_used"] += t[:, :, : layer.n_c].nbytes if t.shape[2] else 0
                elif name.endswith("_window"):
                    out["window"] += t.nbytes
                elif name.endswith("_dense"):
                    out["dense"] += t.nbytes
                else:
                    out["bookkeeping"] += t.nbytes
            if isinstance(layer, _MustafarLayerBase) and layer.is_initialized:
                out["compressed_tokens"] = max(out["compressed_tokens"], layer.n_c)
                out["window_tokens"] = max(out["window_tokens"], layer.n_w)
        out["total"] = out["payload"] + out["bitmaps"] + out["window"] + out["dense"] + out["bookkeeping"]
        out["dense_equivalent"] = self.dense_nbytes()
        return out
