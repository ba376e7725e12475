"""Notebook 03 (``03_kernel_speed_and_format``): bytes of the compressed format against sparsity
(:func:`bytes_table`) and the recorded GPU kernel benchmark in bar-plot form
(:func:`kernel_long_frame`).

All byte accounting is ``mustafar.format``'s; the CPU benchmark runs live through
``mustafar.bench.cpu`` and the recorded files are read with :mod:`mustafar.analysis.results`.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["bytes_table", "kernel_long_frame"]

#: bytes per value of the dtype the paper's layout is defined for (fp16).
_PAPER_ITEMSIZE = 2
#: two recorded sparsities closer than this are the same setting.
_SPARSITY_TOL = 1e-9
#: tokens per "K" in shape labels (``T=16K``).
_K = 1024


def bytes_table(head_dim: int = 128, sparsities: Sequence[float] = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9),
                dtype: torch.dtype = torch.float16):
    """Bytes of one compressed token vector as a fraction of dense, for three layouts.

    ``ours`` (``mustafar.format.format_bytes_ratio``), ``paper`` (the upstream layout: padded to a
    multiple of 8 plus an int32 offset per tile, ``mustafar.format.paper_format_bytes_ratio``; fp16
    only) and ``floor`` (kept values + 1 bit per element). Our layout is that floor by
    construction (``8*W + k*itemsize`` bytes with ``W = D / 64`` words of bitmap: see
    ``mustafar.format``), so both rows come from ``format_bytes_ratio`` and the figure shows them on
    one line.

    Parameters
    ----------
    head_dim : int
        ``D``, a positive multiple of 64 (``mustafar.format``).
    sparsities : sequence of float
        Fractions pruned per token vector, in ``[0, 1]``.
    dtype : torch.dtype
        Dtype of the stored values (dense bytes are ``D * itemsize``).

    Returns
    -------
    pandas.DataFrame
        Long form with columns ``layout, sparsity, bytes_ratio``.
    """
    import pandas as pd

    from mustafar import format as fmt

    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for s in sparsities:
        ours = float(fmt.format_bytes_ratio(head_dim, s, dtype))
        rows.append({"layout": "ours", "sparsity": float(s), "bytes_ratio": ours})
        if itemsize == _PAPER_ITEMSIZE:  # the paper's layout is defined for fp16 values only
            rows.append({"layout": "paper", "sparsity": float(s),
                         "bytes_ratio": float(fmt.paper_format_bytes_ratio(head_dim, s))})
        rows.append({"layout": "floor", "sparsity": float(s), "bytes_ratio": ours})
    return pd.DataFrame(rows)


def kernel_long_frame(df, sparsity: float = 0.7, dtype: str = "float16"):
    """Recorded GPU kernel rows (``results/kernel_h200.json``) -> long form for bar plots.

    Parameters
    ----------
    df : pandas.DataFrame
        Rows of ``mustafar.bench.kernel`` (columns ``H_q, H_kv, B, T`` and the ``*_ms`` times;
        ``sparsity`` / ``dtype`` when the run had several).
    sparsity : float
        Rows at this sparsity are kept.
    dtype : str
        Rows of this dtype are kept.

    Returns
    -------
    pandas.DataFrame
        Columns ``shape`` (e.g. ``"H32/8 B=8 T=16K"``, ``"H9/3 D64 B=3 T=12345"``), ``kernel``
        (``dense SDPA``, ``FP8 proxy (SDPA, T/2)`` and ``fused, FP8 values`` when recorded, ``fused v7`` ...
        ``fused v4`` (each CUDA kernel the run timed; ``fused sparse`` for runs that timed only the default
        one), ``unfused (decode + SDPA)``, ``byte floor (fused)``) and ``ms``.
    """
    import pandas as pd

    sub = df
    if "sparsity" in df.columns:
        sub = sub[(sub["sparsity"] - sparsity).abs() < _SPARSITY_TOL]
    if "dtype" in df.columns:
        sub = sub[sub["dtype"] == dtype]
    per_kernel = {c: f"fused {c.removeprefix('fused_').removesuffix('_ms')}"
                  # fused_v7w_ms: the 16-byte-load v7 of results/kernel_h100.json (commit bcbffc1), now v7 itself;
                  # fused_v6m_ms: v6 with a dense K tile per warp (session 13's candidate files), since deleted
                  for c in ("fused_v7_ms", "fused_v7g_ms", "fused_v7w_ms", "fused_v6_ms", "fused_v6g_ms", "fused_v6m_ms",
                            "fused_v6k_ms", "fused_v5_ms", "fused_v4_ms")
                  if c in sub.columns and sub[c].notna().any()}
    fused = per_kernel or {"fused_ms": "fused sparse"}
    extra = {c: n for c, n in (("fused_fp8_ms", "fused, FP8 values"), ("fp8_proxy_ms", "FP8 proxy (SDPA, T/2)"))
             if c in sub.columns}
    cols = {"dense_ms": "dense SDPA", **extra, **fused, "unfused_ms": "unfused (decode + SDPA)",
            "fused_floor_ms": "byte floor (fused)"}
    rows = []
    for _, r in sub.iterrows():
        t = int(r["T"])
        tt = f"{t // _K}K" if t >= _K and t % _K == 0 else str(t)
        d = f" D{int(r['D'])}" if "D" in r and pd.notna(r["D"]) and int(r["D"]) != 128 else ""
        shape = f"H{int(r['H_q'])}/{int(r['H_kv'])}{d} B={int(r['B'])} T={tt}"
        for c, name in cols.items():
            if c in r and pd.notna(r[c]):
                rows.append({"shape": shape, "kernel": name, "ms": float(r[c])})
    return pd.DataFrame(rows)

