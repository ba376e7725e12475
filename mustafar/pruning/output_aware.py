"""Output-aware pruning: magnitude weighted by how much each entry matters to attention outputs.

Scores (the paper's output-aware alternative):

- keys (``kind="key"``): ``score[b, h, t, c] = |K[b, h, t, c]| * sum_{g < G} sum_{t <= i < t + window} |Q[b, h*G + g, i, c]|``,
  i.e. the key entry's magnitude times the summed magnitude of that channel over the ``window``
  queries that read it first (the query at position ``t`` itself and the ``window - 1`` after it),
  summed over the ``G`` query heads sharing KV head ``h`` (GQA). Tokens near the end with fewer than
  ``window`` following queries use the queries that exist (no rescaling): their scores are smaller,
  which is the honest reading of "attention received so far".
- values (``kind="value"``): ``score[b, h, t, c] = |V[b, h, t, c]| * a[b, h, t]`` where ``a`` is the
  attention weight token ``t`` receives, summed over all queries and the ``G`` query heads of the
  group. ``attn [B, H_q, T_q, T]`` may be passed, or it is computed from ``q`` and ``k`` (causal
  softmax with scale ``D**-0.5``, query ``i`` sits at position ``T - T_q + i``). With
  ``granularity="per_token"`` every channel of a token shares the factor ``a[t]``, so the ranking
  equals plain per-token magnitude except for tokens with ``a[t] == 0`` (all scores tie: the tie
  rule then prunes the lowest channels).

The selection is the shared step :func:`mustafar.pruning.select.select` (per-token or
per-channel-in-token-groups) on the score. The score pieces (:func:`query_abs_sum`,
:func:`windowed_query_sum`, :func:`received_attention`) are also what :mod:`mustafar.cache.scoring`
uses to score tokens incrementally inside the cache: this module is their only home.
"""

from __future__ import annotations

import torch

from ._common import apply_mask, check_input
from .select import select

GRANULARITIES = ("per_token", "per_channel")
KINDS = ("key", "value")


def check_queries(q, x: torch.Tensor, name: str = "q", same_length: bool = True) -> int:
    """Validate ``q [B, H_q, T_q, D]`` against ``x [B, H_kv, T, D]``; return ``G = H_q // H_kv``."""
    if q is None:
        raise ValueError(f"{name}=None: this strategy needs the queries `{name}` [B, H_q, T, D] as a keyword argument")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"{name} must be a rank-4 tensor [B, H_q, T_q, D], got {shape}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"{name} must have a floating dtype, got dtype {q.dtype}")
    B, H, T, D = x.shape
    if q.shape[0] != B or q.shape[-1] != D:
        raise ValueError(f"{name} shape {tuple(q.shape)} does not match B={B}, D={D} of the KV tensor {tuple(x.shape)}")
    if q.shape[1] % H:
        raise ValueError(f"{name} has H_q={q.shape[1]} query heads, not a multiple of H_kv={H}")
    if same_length and q.shape[2] != T:
        raise ValueError(f"{name} must cover the same T={T} positions as the KV tensor, got T_q={q.shape[2]}")
    return q.shape[1] // H


def _score_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def query_abs_sum(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """fp64 ``[B, H_kv, T_q, D]``: ``|Q|`` summed over the ``G`` query heads of each KV head."""
    B, Hq, Tq, D = q.shape
    return q.abs().to(torch.float64).reshape(B, h_kv, Hq // h_kv, Tq, D).sum(2)


def windowed_query_sum(qa: torch.Tensor, window: int, n_old: int = 0) -> torch.Tensor:
    """Per key row, the sum of ``qa`` over the queries that read it first.

    Parameters
    ----------
    qa : fp64 ``[B, H_kv, T_q, D]`` (:func:`query_abs_sum`) of ``T_q`` queries at positions ``0..T_q-1``.
    window : queries summed per key: the key at position ``t`` gets queries ``t .. t+window-1``.
    n_old : rows before the queries (positions ``-n_old..-1``, e.g. a cache's window rows): their sums
        cover the queries ``0 .. t+window-1`` that exist (``t < 0``).

    Returns
    -------
    fp64 ``[B, H_kv, n_old + T_q, D]``.
    """
    qn = qa.shape[2]
    cs = torch.nn.functional.pad(qa.cumsum(2), (0, 0, 1, 0))  # [B, H_kv, T_q+1, D], cs[i] = sum_{<i}
    j = torch.arange(qn, device=qa.device)
    new = cs[:, :, torch.clamp(j + window, max=qn)] - cs[:, :, j]  # [B, H_kv, T_q, D]
    if n_old == 0:
        return new
    i = torch.arange(n_old, device=qa.device)
    old = cs[:, :, torch.clamp(i - n_old + window, min=0, max=qn)] - cs[:, :, :1]  # [B, H_kv, n_old, D]
    return torch.cat([old, new], dim=2)


def key_scores(k: torch.Tensor, q: torch.Tensor, window: int = 32) -> torch.Tensor:
    """Output-aware key scores ``[B, H_kv, T, D]`` (see module docstring)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    check_queries(q, k)
    wsum = windowed_query_sum(query_abs_sum(q, k.shape[1]), window)  # [B, H_kv, T, D]
    dt = _score_dtype(k)
    return k.abs().to(dt) * wsum.to(dt)


_RECEIVED_CHUNK_ELEMS = 1 << 24  # bound of one [B, H_q, chunk, T] score block in received_attention


def received_attention(query: torch.Tensor, key: torch.Tensor, mask=None, scaling: float | None = None,
                       key_pos0: int = 0, ncols: int | None = None) -> torch.Tensor:
    """Attention weight the last ``ncols`` keys receive, summed over the queries and the G heads of each group.

    Parameters
    ----------
    query : ``[B, H_q, T_q, D]``; query ``j`` sits at the position of key column ``T_k - T_q + j``.
    key : ``[B, H_kv, T_k, D]`` every key the queries attend to (softmax denominator).
    mask : ``None`` (causal), int32 ``kv_start [B]`` (causal + positions ``< kv_start`` masked; key column
        ``c`` has position ``key_pos0 + c``) or a 4D sdpa mask ``[B|1, 1|H_q, T_q, >=T_k]`` (bool: True =
        attend, or additive float).
    scaling : softmax scale (default ``D**-0.5``).
    ncols : how many of the last key columns to return (default all ``T_k``).

    Returns
    -------
    ``[B, H_kv, ncols]`` (fp64 for fp64 keys, else fp32). Scores are formed in chunks of queries so one
    block holds at most ``2**24`` elements; fully masked query rows contribute 0.
    """
    B, Hq, Tq, D = query.shape
    H, Tk = key.shape[1], key.shape[2]
    G = Hq // H
    ncols = Tk if ncols is None else ncols
    scaling = D ** -0.5 if scaling is None else scaling
    dt = _score_dtype(key)
    kf = key.to(dt).transpose(-1, -2)  # [B, H_kv, D, T_k]
    cols = torch.arange(Tk, device=key.device)
    out = torch.zeros(B, H, ncols, dtype=dt, device=key.device)
    chunk = max(1, _RECEIVED_CHUNK_ELEMS // max(1, B * Hq * Tk))
    for j0 in range(0, Tq, chunk):
        j1 = min(Tq, j0 + chunk)
        c = j1 - j0
        qg = query[:, :, j0:j1].to(dt).reshape(B, H, G * c, D)  # [B, H_kv, G*c, D]
        sc = (qg @ kf * scaling).view(B, H, G, c, Tk)  # [B, H_kv, G, c, T_k]
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            m = mask[:, :, j0:j1, :Tk].to(key.device)  # [B|1, 1|H_q, c, T_k]
            m = m[:, :, None] if m.shape[1] == 1 else m.reshape(m.shape[0], H, G, c, Tk)
            sc = sc.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else sc + m.to(dt)
        else:
            qpos = torch.arange(j0, j1, device=key.device) + (Tk - Tq)  # [c]
            allowed = (cols[None, :] <= qpos[:, None])[None]  # [1, c, T_k]
            if isinstance(mask, torch.Tensor):  # kv_start [B]
                allowed = allowed & ((cols + key_pos0)[None, None, :] >= mask.to(key.device).long()[:, None, None])
            sc = sc.masked_fill(~allowed[:, None, None], float("-inf"))
        p = torch.softmax(sc, dim=-1).nan_to_num_(0.0)  # [B, H_kv, G, c, T_k]
        out += p.reshape(B, H, G * c, Tk).sum(2)[..., Tk - ncols:]
    return out


def attention_received(
    q: torch.Tensor | None, k: torch.Tensor | None, attn: torch.Tensor | None, h_kv: int
) -> torch.Tensor:
    """Attention weight each key token receives, summed over queries and the G heads: ``[B, H_kv, T]``.

    From ``attn [B, H_q, T_q, T]`` when given, else :func:`received_attention` of ``q`` over ``k``
    (causal, scale ``D**-0.5``).
    """
    if attn is None:
        if k is None:
            raise ValueError("value scores need `attn` [B, H_q, T_q, T] or both `q` and `k` as keyword arguments (k=None)")
        check_input(k, 0.0, name="k")
        check_queries(q, k, same_length=False)
        if q.shape[2] > k.shape[2]:
            raise ValueError(f"q has T_q={q.shape[2]} > T={k.shape[2]} key positions")
        return received_attention(q, k)
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4 or not attn.dtype.is_floating_point:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attn must be a floating rank-4 tensor [B, H_q, T_q, T], got {shape}")
    B, Hq, Tq, T = attn.shape
    if Hq % h_kv:
        raise ValueError(f"attn has H_q={Hq} heads, not a multiple of H_kv={h_kv}")
    return attn.float().reshape(B, h_kv, (Hq // h_kv) * Tq, T).sum(2)  # [B, H_kv, T]


def value_scores(v: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """Output-aware value scores ``|V| x a`` ``[B, H_kv, T, D]`` from the attention received ``a [B, H_kv, T]``."""
    dt = _score_dtype(v)
    return v.abs().to(dt) * received.to(dt)[..., None]


def output_aware(
    x: torch.Tensor,
    sparsity: float,
    *,
    kind: str = "key",
    granularity: str = "per_token",
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    attn: torch.Tensor | None = None,
    window: int = 32,
    group_size: int = 32,
    return_mask: bool = False,
):
    """Output-aware pruning of K (``kind="key"``) or V (``kind="value"``).

    Parameters
    ----------
    x : Tensor ``[B, H_kv, T, D]``, floating: the keys or the values to prune.
    sparsity : float in [0, 1).
    kind : ``"key"`` or ``"value"``.
    granularity : ``"per_token"`` (keep ``kept_count(D, s)`` per token vector) or ``"per_channel"``
        (per channel within groups of ``group_size`` tokens, as ``per_channel_magnitude``).
    q : Tensor ``[B, H_q, T, D]`` post-RoPE queries; required for keys, and for values when ``attn``
        is not given (then with ``k``).
    k : Tensor ``[B, H_kv, T, D]`` keys, for value scores computed from ``q``.
    attn : Tensor ``[B, H_q, T_q, T]`` attention probabilities, for value scores.
    window : int, queries summed per key (default 32).
    group_size : int, tokens per group for ``granularity="per_channel"``.
    return_mask : bool, also return the bool keep-mask.

    Returns
    -------
    Tensor ``[B, H_kv, T, D]`` of ``x.dtype`` (and the mask).
    """
    s = check_input(x, sparsity)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if kind == "key":
        score = key_scores(x, q, window)
    else:
        a = attention_received(q, k, attn, x.shape[1])  # [B, H_kv, T]
        if a.shape[0] != x.shape[0] or a.shape[-1] != x.shape[2]:
            raise ValueError(f"attention covers shape {tuple(a.shape)} but values have B={x.shape[0]}, T={x.shape[2]}")
        score = value_scores(x, a)
    return apply_mask(x, select(score, s, granularity, group_size=group_size), return_mask)
