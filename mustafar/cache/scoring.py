"""Query-driven scoring state of one cache layer (``output_aware``, ``think``).

The formulas live in :mod:`mustafar.pruning.output_aware` / :mod:`mustafar.pruning.think` and the
selection in :func:`mustafar.pruning.select.select`; this module only keeps the running sums a cache
needs to apply them to tokens that arrive one at a time:

* ``qacc`` fp64 ``[B, H_kv, wcap, D]`` (K output-aware): per dense-window row ``t``, the G-summed ``|Q|``
  of the queries at positions ``t .. t+window-1`` that have arrived so far.
* ``vacc`` fp32 ``[B, H_kv, wcap]`` (V output-aware): attention weight received so far, summed over
  queries and the G heads.
* ``think_keep`` bool ``[B, H_kv, D]`` (K ThinK): the kept channels of the last multi-token call.

Window rows ``>= n_w`` of the accumulators are always 0 (a new window row starts empty).
"""

from __future__ import annotations

import torch

from mustafar.pruning.output_aware import query_abs_sum, received_attention, value_scores, windowed_query_sum
from mustafar.pruning.select import select
from mustafar.pruning.think import think_channel_scores

__all__ = ["QueryScores"]


def _valid_keys(mask, tk: int):
    """``[B, T_k]`` bool: key columns the last query may read (a 4D sdpa mask), else ``None``."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    m = mask[:, 0, -1, :tk]  # [B|1, T_k]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


class QueryScores:
    """Running query statistics of one layer's dense window, and the keep-masks they imply.

    Parameters
    ----------
    cfg : :class:`mustafar.MustafarConfig` with a query-driven strategy on at least one side.
    head_dim : ``D``.
    """

    def __init__(self, cfg, head_dim: int):
        self.cfg = cfg
        self.head_dim = head_dim
        self.k_oa = cfg.needs_queries("k") and cfg.k_strategy == "output_aware"
        self.k_think = cfg.needs_queries("k") and cfg.k_strategy == "think"
        self.v_oa = cfg.needs_queries("v") and cfg.v_strategy == "output_aware"
        kk = cfg.k_strategy_kwargs
        self.k_window = kk.get("window", 32)
        self.obs_window = kk.get("obs_window", 32)
        self.qacc = self.vacc = self.think_keep = None

    def allocate(self, batch: int, heads: int, device) -> None:
        wcap = self.cfg.local_window + self.cfg.compress_chunk + 1
        if self.k_oa:
            self.qacc = torch.zeros(batch, heads, wcap, self.head_dim, dtype=torch.float64, device=device)
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
        kw = getattr(self.cfg, f"{which}_strategy_kwargs")
        return select(score, getattr(self.cfg, f"{which}_sparsity"), kw.get("granularity", "per_token"),
                      group_size=kw.get("group_size", 32))

    def masks(self, k_rows, v_rows, qsum, asum):
        """Keep-masks of ``k_rows, v_rows [B, H, n, D]`` (``None`` for a side without queries)."""
        km = vm = None
        if self.k_oa:
            km = self._select("k", k_rows.abs().float() * qsum.float())
        elif self.k_think:
            if self.think_keep is None:
                raise RuntimeError("ThinK channel set not computed: the cache saw no multi-token call with queries "
                                   "(a one-token prompt); prefill at least two tokens")
            b, h, d = self.think_keep.shape
            km = self.think_keep[:, :, None, :].expand(b, h, k_rows.shape[2], d)
        if self.v_oa:
            vm = self._select("v", value_scores(v_rows.float(), asum))
        return km, vm

    # -- multi-token call (prefill, a later turn)
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
            qsum = windowed_query_sum(query_abs_sum(query, H), self.k_window, n_old)  # [B, H, t, D]
            qsum[:, :, :n_old] += self.qacc[:, :, :n_old]
        if self.k_think:
            kt, qt = tail_k, query
            valid = _valid_keys(mask, key_full.shape[2])  # [B, T_k] bool or None (no padding info)
            if valid is not None:  # padding tokens' keys / queries do not vote
                kt = tail_k * valid[:, None, -t:, None].to(tail_k.dtype)
                qt = query * valid[:, None, -qn:, None].to(query.dtype)
            sc = think_channel_scores(kt, qt, self.obs_window)  # [B, H, D]
            self.think_keep = select(sc, self.cfg.k_sparsity, "head_channels", tokens=1)[:, :, 0]  # [B, H, D]
        if self.v_oa:
            asum = received_attention(query, key_full, mask, scaling, 0, t).float()  # [B, H, t]
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
    def observe(self, query, key, mask, scaling, key_pos0, n_w) -> None:
        """Add one decode query ``[B, H_q, 1, D]`` (the newest window row's position) to the window sums.

        ``key [B, H, T_k, D]`` are the keys the attention read, starting at position ``key_pos0`` (the
        full sequence, or only the dense window in the compressed fast path).
        """
        if self.k_oa:
            qa = query_abs_sum(query, key.shape[1])[:, :, 0]  # [B, H, D]
            lo = max(0, n_w - self.k_window)
            self.qacc[:, :, lo:n_w] += qa[:, :, None]
        if self.v_oa:
            self.vacc[:, :, :n_w] += received_attention(query, key, mask, scaling, key_pos0, n_w).float()

    def shift(self, n: int, n_w: int) -> None:
        """Drop the first ``n`` window rows' accumulators (they were compressed)."""
        for acc in (self.qacc, self.vacc):
            if acc is not None:
                acc[:, :, : n_w - n] = acc[:, :, n:n_w].clone()
                acc[:, :, n_w - n :] = 0
