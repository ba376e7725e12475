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

The selection uses the per-token (``topk_mask``) or per-channel-in-token-groups rule on the score.
"""

from __future__ import annotations

import torch

from ._common import apply_mask, check_input, group_channel_mask, kept_count, topk_mask

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


def key_scores(k: torch.Tensor, q: torch.Tensor, window: int = 32) -> torch.Tensor:
    """Output-aware key scores ``[B, H_kv, T, D]`` (see module docstring)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    G = check_queries(q, k)
    B, H, T, D = k.shape
    qa = q.abs().to(torch.float64).reshape(B, H, G, T, D).sum(2)  # [B, H_kv, T, D]
    # windowed forward sum over queries t..t+window-1 via a cumulative sum (fp64: exact enough)
    cs = torch.nn.functional.pad(qa.cumsum(2), (0, 0, 1, 0))  # [B, H_kv, T+1, D], cs[i] = sum_{<i}
    t = torch.arange(T, device=k.device)
    hi = torch.clamp(t + window, max=T)
    wsum = cs[:, :, hi] - cs[:, :, t]  # [B, H_kv, T, D]
    dt = _score_dtype(k)
    return k.abs().to(dt) * wsum.to(dt)


def attention_received(
    q: torch.Tensor | None, k: torch.Tensor | None, attn: torch.Tensor | None, h_kv: int
) -> torch.Tensor:
    """Attention weight each key token receives, summed over queries and the G heads: ``[B, H_kv, T]``."""
    if attn is None:
        if k is None:
            raise ValueError("value scores need `attn` [B, H_q, T_q, T] or both `q` and `k` as keyword arguments (k=None)")
        check_input(k, 0.0, name="k")
        G = check_queries(q, k, same_length=False)
        B, H, T, D = k.shape
        Tq = q.shape[2]
        if Tq > T:
            raise ValueError(f"q has T_q={Tq} > T={T} key positions")
        dt = _score_dtype(k)
        qg = q.to(dt).reshape(B, H, G * Tq, D)  # [B, H_kv, G*T_q, D]
        s = qg @ k.to(dt).transpose(-1, -2) * D**-0.5  # [B, H_kv, G*T_q, T]
        qpos = (torch.arange(Tq, device=k.device) + T - Tq).repeat(G)  # [G*T_q]
        causal = torch.arange(T, device=k.device)[None, :] <= qpos[:, None]  # [G*T_q, T]
        s = s.masked_fill(~causal, float("-inf"))
        return torch.softmax(s, dim=-1).sum(2)  # [B, H_kv, T]
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4 or not attn.dtype.is_floating_point:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attn must be a floating rank-4 tensor [B, H_q, T_q, T], got {shape}")
    B, Hq, Tq, T = attn.shape
    if Hq % h_kv:
        raise ValueError(f"attn has H_q={Hq} heads, not a multiple of H_kv={h_kv}")
    return attn.float().reshape(B, h_kv, (Hq // h_kv) * Tq, T).sum(2)  # [B, H_kv, T]


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
        score = x.abs().to(_score_dtype(x)) * a.to(_score_dtype(x))[..., None]
    if granularity == "per_token":
        mask = topk_mask(score, kept_count(x.shape[-1], s))
    else:
        mask = group_channel_mask(score, s, group_size)
    return apply_mask(x, mask, return_mask)
