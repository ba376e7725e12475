"""Library side of the notebooks: every computation a notebook shows lives here (notebooks hold no
function definitions).

Sections
--------
* availability: :func:`available` / :func:`missing_parts` say which parts of ``mustafar`` are
  importable right now, so a notebook can say plainly what it cannot show yet.
* KV statistics: :func:`prompt_ids`, :func:`capture_prompt`, :func:`channel_magnitudes`,
  :func:`channel_stats` (the paper's Figure 2: outlier key channels, flat values).
* pruning error: :func:`attention_output`, :func:`prune_kv`, :func:`output_error`,
  :func:`error_sweep` (attention-output error vs sparsity, K only / V only / joint, every strategy),
  :func:`mask_examples` (what survives, per strategy).
* bytes: :func:`bytes_table` (our format, the paper's layout, the bitmap floor).
* results files: :func:`results_dir`, :func:`load_results` (a results JSON -> DataFrame + provenance).
* throughput / memory: :func:`decode_throughput`, :func:`cache_memory`.
* accuracy: :func:`accuracy_results` (load a complete sweep or run ``mustafar.eval.run_sweep``),
  :func:`accuracy_table`.
* kernels: :func:`kernel_long_frame` (recorded GPU rows -> bar-plot form).
* recorded e2e grid (``mustafar.bench.e2e --grid --longest``): :func:`read_results_json`,
  :func:`provenance_brief`, :func:`provenance_line`, :func:`e2e_cache_label`, :func:`e2e_best_table`,
  :func:`e2e_targets`, :func:`e2e_tokens_vs_batch`, :func:`e2e_longest_table`, :func:`e2e_linearity_table`,
  :func:`e2e_fit_residuals`, :func:`e2e_cycle_table`, :func:`e2e_token_checks`.

Shapes follow docs/design.md: ``B`` batch, ``H_kv`` KV heads, ``H_q`` query heads,
``G = H_q // H_kv``, ``T`` tokens, ``D`` head_dim.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = [
    "available",
    "missing_parts",
    "describe_parts",
    "prompt_ids",
    "capture_prompt",
    "channel_magnitudes",
    "channel_stats",
    "layer_summary",
    "attention_probs",
    "attention_output",
    "prune_kv",
    "output_error",
    "error_sweep",
    "mask_examples",
    "kept_summary",
    "supports",
    "STRATEGY_TARGETS",
    "bytes_table",
    "floor_bytes_ratio",
    "results_dir",
    "results_path",
    "load_results",
    "decode_throughput",
    "cache_memory",
    "dense_cache_bytes",
    "kv_geometry",
    "accuracy_missing",
    "accuracy_results",
    "accuracy_table",
    "strategy_label",
    "kernel_long_frame",
    "E2E_CACHE_ORDER",
    "read_results_json",
    "provenance_brief",
    "provenance_line",
    "e2e_cache_label",
    "e2e_best_table",
    "e2e_targets",
    "e2e_tokens_vs_batch",
    "e2e_longest_table",
    "e2e_linearity_table",
    "e2e_fit_residuals",
    "e2e_cycle_table",
    "e2e_token_checks",
]

# --------------------------------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------------------------------

#: the parts of the package the notebooks use, as ``name -> (module, attributes)``.
PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "models": ("mustafar.models", ("load_model",)),
    "capture": ("mustafar.capture", ("capture_qkv",)),
    "pruning": ("mustafar.pruning", ("prune", "STRATEGIES")),
    "format": ("mustafar.format", ("format_bytes_ratio", "paper_format_bytes_ratio")),
    "ops": ("mustafar.ops", ("sparse_decode",)),
    "bench_cpu": ("mustafar.bench.cpu", ()),
    "cache": ("mustafar.cache", ("MustafarConfig", "MustafarCache")),
    "eval": ("mustafar.eval", ("run_sweep", "summarize", "pareto")),
}


def available(part: str) -> bool:
    """True iff the named part (a key of ``PARTS``) imports and has its public attributes."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; known: {sorted(PARTS)}")
    return _part_problem(part) is None


def _part_problem(part: str) -> str | None:
    module, attrs = PARTS[part]
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available", say why
        return f"{module} does not import ({type(e).__name__}: {e})"
    gone = [a for a in attrs if not hasattr(mod, a)]
    return f"{module} lacks {', '.join(gone)}" if gone else None


def missing_parts(parts: Iterable[str] | None = None) -> dict[str, str]:
    """``{part: why}`` for every part (of ``parts``, default all) that is not usable now."""
    out = {}
    for p in parts if parts is not None else PARTS:
        if p not in PARTS:
            raise ValueError(f"unknown part {p!r}; known: {sorted(PARTS)}")
        why = _part_problem(p)
        if why is not None:
            out[p] = why
    return out


def describe_parts(parts: Iterable[str]) -> str:
    """One line per part: ``ok`` or ``NOT AVAILABLE: why`` (what a notebook prints up front)."""
    lines = []
    for p in parts:
        why = _part_problem(p) if p in PARTS else f"unknown part {p!r}"
        lines.append(f"{p:10s} {'ok' if why is None else 'NOT AVAILABLE: ' + why}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# KV statistics
# --------------------------------------------------------------------------------------------------


def prompt_ids(tokenizer, n_tokens: int, offset_chars: int = 0) -> torch.Tensor:
    """Token ids ``[1, n_tokens]`` of real English prose shipped with Python (``mustafar.eval.texts``).

    Parameters
    ----------
    tokenizer : a transformers tokenizer.
    n_tokens : int >= 1, prompt length in tokens.
    offset_chars : int >= 0, where in the text to start (different windows of the same document).
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if not isinstance(offset_chars, int) or offset_chars < 0:
        raise ValueError(f"offset_chars must be a non-negative int, got {offset_chars!r}")
    from mustafar.eval.texts import prose_text

    text = prose_text()
    chunk = text[offset_chars: offset_chars + 8 * n_tokens + 64]  # ~4 chars/token; generous
    ids = tokenizer(chunk, return_tensors="pt", add_special_tokens=False).input_ids  # [1, T']
    if ids.shape[1] < n_tokens:
        raise ValueError(f"n_tokens={n_tokens} is longer than the text from offset_chars={offset_chars} ({ids.shape[1]} tokens)")
    return ids[:, :n_tokens]


def capture_prompt(model, input_ids: torch.Tensor, layers: Sequence[int] | None = None) -> dict:
    """Post-RoPE Q, K, V of every (or the chosen) layer for one prompt, as float32 on CPU.

    Parameters
    ----------
    model : a transformers causal LM.
    input_ids : int ``[B, T]``.
    layers : optional layer indices to keep.

    Returns
    -------
    ``{layer: {"q": [B, H_q, T, D], "k": [B, H_kv, T, D], "v": [B, H_kv, T, D]}}``
    """
    from mustafar.capture import capture_qkv

    qkv = capture_qkv(model, input_ids, layers=None if layers is None else [int(i) for i in layers])
    keep = sorted(qkv)
    return {li: {t: qkv[li][t].detach().float().cpu() for t in ("q", "k", "v")} for li in keep}


def channel_magnitudes(x: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """Per-channel magnitude of a K or V tensor.

    Parameters
    ----------
    x : ``[B, H, T, D]``.
    reduce : ``"max"`` (max |x| over batch and tokens) or ``"mean"`` (mean |x|).

    Returns
    -------
    float32 ``[H, D]``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a [B, H, T, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    a = x.detach().float().abs().transpose(0, 1).flatten(1, 2)  # [H, B*T, D]
    if reduce == "max":
        return a.amax(dim=1)
    if reduce == "mean":
        return a.mean(dim=1)
    raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")


def channel_stats(qkv: dict, reduce: str = "max"):
    """Per layer, head and tensor (K, V): the largest and the median channel magnitude.

    ``ratio = max_channel / median_channel``: large for keys with outlier channels, near 1-2 for the
    flat values (the paper's Figure 2 observation).

    Parameters
    ----------
    qkv : ``{layer: {"k": [B, H_kv, T, D], "v": ...}}`` (from :func:`capture_prompt`).
    reduce : how magnitudes are reduced over tokens, see :func:`channel_magnitudes`.

    Returns
    -------
    DataFrame with columns ``layer, tensor, head, max_channel, argmax_channel, median_channel, ratio``;
    ``head == "all"`` rows pool the channels of every head of the layer.
    """
    import pandas as pd

    rows = []
    for li in sorted(qkv):
        for name, key in (("K", "k"), ("V", "v")):
            m = channel_magnitudes(qkv[li][key], reduce)  # [H_kv, D]
            for h in range(m.shape[0]):
                rows.append(_stat_row(li, name, h, m[h]))
            rows.append(_stat_row(li, name, "all", m.flatten()))
    return pd.DataFrame(rows)


def _stat_row(layer, tensor, head, m: torch.Tensor) -> dict:
    mx, med = float(m.max()), float(m.median())
    return {
        "layer": layer,
        "tensor": tensor,
        "head": head,
        "max_channel": mx,
        "argmax_channel": int(m.argmax()),
        "median_channel": med,
        "ratio": mx / med if med > 0 else math.inf,
    }


def layer_summary(stats):
    """One row per layer from :func:`channel_stats`: max / median channel and their ratio for K and V
    (channels of all heads pooled)."""
    pooled = stats[stats["head"].astype(str) == "all"]
    wide = pooled.pivot(index="layer", columns="tensor", values=["max_channel", "median_channel", "ratio"])
    wide.columns = [f"{t}_{c.replace('_channel', '')}" for c, t in wide.columns]
    order = ["K_max", "K_median", "K_ratio", "V_max", "V_median", "V_ratio"]
    return wide[[c for c in order if c in wide.columns]]


# --------------------------------------------------------------------------------------------------
# attention-output error under pruning
# --------------------------------------------------------------------------------------------------

#: which tensors each strategy can prune (``"k"``, ``"v"``) and the sparsities it allows (None: any).
STRATEGY_TARGETS: dict[str, dict] = {
    "per_token_magnitude": {"targets": ("k", "v"), "sparsities": None},
    "per_channel_magnitude": {"targets": ("k", "v"), "sparsities": None},
    "output_aware": {"targets": ("k", "v"), "sparsities": None},
    "think": {"targets": ("k",), "sparsities": None},  # ThinK is a key-cache method
    "semi_structured_2_4": {"targets": ("k", "v"), "sparsities": (0.5,)},
}

_TARGETS = ("k", "v", "kv")


def supports(strategy: str, target: str, sparsity: float) -> bool:
    """Whether ``strategy`` can prune ``target`` (``"k"``, ``"v"``, ``"kv"``) at ``sparsity``."""
    if strategy not in STRATEGY_TARGETS:
        raise ValueError(f"unknown strategy {strategy!r}; known: {sorted(STRATEGY_TARGETS)}")
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    spec = STRATEGY_TARGETS[strategy]
    if spec["sparsities"] is not None and not any(abs(sparsity - s) < 1e-9 for s in spec["sparsities"]):
        return False
    return all(t in spec["targets"] for t in ("k", "v") if t in target)


def _gqa_expand(x: torch.Tensor, g: int) -> torch.Tensor:
    return x if g == 1 else x.repeat_interleave(g, dim=1)  # [B, H_kv*G, T, D]


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention probabilities ``[B, H_q, T_q, T]`` (float32), query ``i`` at
    position ``T - T_q + i``; ``q [B, H_q, T_q, D]``, ``k [B, H_kv, T, D]``."""
    b, hq, tq, d = q.shape
    t = k.shape[2]
    kk = _gqa_expand(k.float(), hq // k.shape[1])  # [B, H_q, T, D]
    s = torch.einsum("bhqd,bhtd->bhqt", q.float(), kk) / math.sqrt(d)
    pos_q = torch.arange(t - tq, t)[:, None]
    s = s.masked_fill(torch.arange(t)[None, :] > pos_q, -math.inf)
    return torch.softmax(s, dim=-1)


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Causal attention output of the last ``n_queries`` queries over all ``T`` tokens.

    Parameters
    ----------
    q : ``[B, H_q, T, D]``; k, v : ``[B, H_kv, T, D]`` (GQA: query head ``h`` reads KV head ``h // G``).
    n_queries : int in ``[1, T]``.

    Returns
    -------
    float32 ``[B, H_q, n_queries, D]``.
    """
    t = k.shape[2]
    if not 1 <= n_queries <= t:
        raise ValueError(f"n_queries must be in [1, T={t}], got {n_queries!r}")
    p = attention_probs(q[:, :, t - n_queries:], k)  # [B, H_q, n, T]
    vv = _gqa_expand(v.float(), q.shape[1] // v.shape[1])  # [B, H_q, T, D]
    return torch.einsum("bhqt,bhtd->bhqd", p, vv)


def _prune_one(x, sparsity, strategy, kind, q, k_full, attn_cols, return_mask):
    from mustafar.pruning import prune

    kw = {}
    if strategy == "output_aware":
        kw = {"kind": "key", "q": q[:, :, : x.shape[2]]} if kind == "k" else {"kind": "value", "attn": attn_cols}
    elif strategy == "think":
        kw = {"q": q}
    return prune(x, sparsity, strategy, return_mask=return_mask, **kw)


def prune_kv(layer: dict, sparsity: float, strategy: str, target: str = "kv", window: int = 32,
             return_masks: bool = False):
    """Prune the K and/or V of one captured layer, keeping the most recent ``window`` tokens dense
    (the paper's local window).

    Query-driven strategies get what they need from the capture: ``output_aware`` keys use the
    queries at the pruned positions, its values the attention every token receives from all
    ``T`` queries; ``think`` uses the last 32 queries.

    Parameters
    ----------
    layer : ``{"q": [B, H_q, T, D], "k": [B, H_kv, T, D], "v": [B, H_kv, T, D]}``.
    sparsity : float in [0, 1).
    strategy : a key of ``mustafar.pruning.STRATEGIES``.
    target : ``"k"``, ``"v"`` or ``"kv"`` (both, same strategy and sparsity).
    window : int >= 0, most recent tokens kept dense.
    return_masks : also return ``{"k": mask or None, "v": ...}`` (bool ``[B, H_kv, T, D]``).

    Returns
    -------
    (k, v) or (k, v, masks).
    """
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}")
    if not supports(strategy, target, sparsity):
        raise ValueError(f"strategy {strategy!r} cannot prune target {target!r} at sparsity {sparsity}")
    q, k, v = layer["q"], layer["k"], layer["v"]
    t = k.shape[2]
    if not isinstance(window, int) or not 0 <= window < t:
        raise ValueError(f"window must be an int in [0, T={t}), got {window!r}")
    tc = t - window  # tokens that get pruned: [0, tc)
    attn_cols = None
    if strategy == "output_aware" and "v" in target:
        attn_cols = attention_probs(q, k)[..., :tc]  # [B, H_q, T, tc]: attention received by pruned tokens
    out = {"k": k, "v": v}
    masks = {"k": None, "v": None}
    for kind in ("k", "v"):
        if kind not in target:
            continue
        x = out[kind]
        pruned, m = _prune_one(x[:, :, :tc], sparsity, strategy, kind, q, k, attn_cols, True)
        out[kind] = torch.cat([pruned, x[:, :, tc:]], dim=2)  # [B, H_kv, T, D]
        masks[kind] = torch.cat([m, torch.ones_like(x[:, :, tc:], dtype=torch.bool)], dim=2)
    return (out["k"], out["v"], masks) if return_masks else (out["k"], out["v"])


def output_error(layer: dict, sparsity: float, strategy: str, target: str = "kv", n_queries: int = 32,
                 window: int = 32) -> float:
    """Relative attention-output error ``||O_pruned - O_dense||_F / ||O_dense||_F`` of the last
    ``n_queries`` queries of one captured layer (see :func:`prune_kv` for the arguments)."""
    ref = attention_output(layer["q"], layer["k"], layer["v"], n_queries)
    k, v = prune_kv(layer, sparsity, strategy, target, window)
    out = attention_output(layer["q"], k, v, n_queries)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def error_sweep(qkv: dict, strategies: Sequence[str], sparsities: Sequence[float],
                targets: Sequence[str] = ("k", "v", "kv"), n_queries: int = 32, window: int = 32,
                progress: bool = True):
    """Attention-output error for every (layer, strategy, target, sparsity) a strategy supports.

    Returns
    -------
    DataFrame with columns ``layer, strategy, target, sparsity, rel_error``; unsupported
    combinations (ThinK on values, 2:4 away from 0.5) are left out.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    jobs = [(li, st, tg, s) for li in sorted(qkv) for st in strategies for tg in targets for s in sparsities
            if supports(st, tg, s)]
    rows = []
    for li, st, tg, s in tqdm(jobs, desc="error sweep", disable=not progress):
        rows.append({"layer": li, "strategy": st, "target": tg, "sparsity": float(s),
                     "rel_error": output_error(qkv[li], s, st, tg, n_queries, window)})
    return pd.DataFrame(rows)


def mask_examples(layer: dict, sparsity: float, strategies: Sequence[str], kind: str = "k", head: int = 0,
                  tokens: int = 64, window: int = 32) -> dict:
    """Keep-masks of one head for each strategy: ``{label: bool ndarray [tokens, D]}``.

    The first ``tokens`` positions of the prompt are shown (all of them pruned when the prompt is
    longer than ``tokens + window``). ``semi_structured_2_4`` is always shown at its fixed 0.5.
    """
    out = {}
    for st in strategies:
        s = 0.5 if st == "semi_structured_2_4" else sparsity
        if not supports(st, kind, s):
            continue
        _, _, masks = prune_kv(layer, s, st, kind, window, return_masks=True)
        out[f"{st} ({s:.0%})"] = masks[kind][0, head, :tokens].numpy()
    return out


def kept_summary(masks: dict):
    """How much each keep-mask keeps: ``{label: bool [T, D]}`` -> DataFrame with ``kept_fraction``,
    ``min_kept_per_token``, ``max_kept_per_token`` and ``same_count_every_token`` (the property the
    fixed-stride bitmap format needs: true for per-token top-k, 2:4 and ThinK, not per-channel)."""
    import numpy as np
    import pandas as pd

    rows = []
    for label, m in masks.items():
        per_row = np.asarray(m, dtype=bool).sum(-1)  # [T]
        rows.append({"mask": label, "kept_fraction": round(float(np.mean(m)), 3),
                     "min_kept_per_token": int(per_row.min()), "max_kept_per_token": int(per_row.max()),
                     "same_count_every_token": bool(per_row.min() == per_row.max())})
    return pd.DataFrame(rows).set_index("mask")


# --------------------------------------------------------------------------------------------------
# bytes
# --------------------------------------------------------------------------------------------------


def floor_bytes_ratio(head_dim: int, sparsity: float, itemsize: int = 2) -> float:
    """The bitmap floor ``(k*itemsize + D/8) / (D*itemsize)`` with ``k = D - floor(s*D + 0.5)``."""
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim!r}")
    k = head_dim - math.floor(sparsity * head_dim + 0.5)
    return (k * itemsize + head_dim / 8) / (head_dim * itemsize)


def bytes_table(head_dim: int = 128, sparsities: Sequence[float] = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9),
                dtype: torch.dtype = torch.float16):
    """Bytes of one compressed token vector as a fraction of dense, for three layouts.

    ``ours`` (``mustafar.format.format_bytes_ratio``), ``paper`` (the upstream layout: padded to a
    multiple of 8 plus an int32 offset per tile, ``mustafar.format.paper_format_bytes_ratio``; fp16 only) and
    ``floor`` (kept values + 1 bit per element).

    Returns
    -------
    long DataFrame with columns ``layout, sparsity, bytes_ratio``.
    """
    import pandas as pd
    from mustafar import format as fmt

    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for s in sparsities:
        rows.append({"layout": "ours", "sparsity": float(s), "bytes_ratio": float(fmt.format_bytes_ratio(head_dim, s, dtype))})
        if itemsize == 2:  # the paper's layout is defined for fp16 values only
            rows.append({"layout": "paper", "sparsity": float(s), "bytes_ratio": float(fmt.paper_format_bytes_ratio(head_dim, s))})
        rows.append({"layout": "floor", "sparsity": float(s), "bytes_ratio": floor_bytes_ratio(head_dim, s, itemsize)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# results files
# --------------------------------------------------------------------------------------------------


def results_dir() -> Path:
    """``$MUSTAFAR_RESULTS`` if set, else ``<repo>/results`` (next to ``figures/``)."""
    env = os.environ.get("MUSTAFAR_RESULTS")
    if env:
        return Path(env)
    from mustafar.plotting import _repo_root

    root = _repo_root()
    return (root / "results") if root is not None else Path.cwd() / "results"


def results_path(name: str) -> Path:
    """Path of ``results/<name>`` (``name`` with or without ``.json``)."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"results name must be a plain file name, got {name!r}")
    return results_dir() / (name if name.endswith(".json") else name + ".json")


_ROW_KEYS = ("rows", "results", "records", "data", "runs", "measurements")
_META_KEYS = ("provenance", "meta", "metadata", "env", "environment")


def _results_file(name_or_path: str | os.PathLike) -> Path:
    """An existing results file: ``name_or_path`` itself, or ``results/<name>`` for a plain name."""
    p = Path(name_or_path)
    if not p.is_file() and "/" not in str(name_or_path):
        p = results_path(str(name_or_path))
    if not p.is_file():
        raise FileNotFoundError(f"results file {p} does not exist")
    return p


def load_results(name_or_path: str | os.PathLike):
    """Read a results JSON into ``(DataFrame, meta)``.

    Accepted layouts: a list of row dicts; or a dict holding the rows under one of
    ``rows / results / records / data / runs / measurements`` and anything else as metadata
    (nested ``provenance`` / ``meta`` dicts are merged into ``meta``, e.g. device, commit, date).

    Parameters
    ----------
    name_or_path : a file under ``results/`` (``"kernel_h200"``) or a path.

    Returns
    -------
    (pandas.DataFrame, dict). Raises ``FileNotFoundError`` if the file does not exist.
    """
    import pandas as pd

    p = _results_file(name_or_path)
    data = json.loads(p.read_text())
    meta: dict = {"path": str(p)}
    if isinstance(data, list):
        return pd.DataFrame(data), meta
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON list or object, got {type(data).__name__}")
    rows_key = next((k for k in _ROW_KEYS if isinstance(data.get(k), list)), None)
    if rows_key is None:  # fall back to the first list of dicts
        rows_key = next((k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)), None)
    for k, v in data.items():
        if k == rows_key:
            continue
        if k in _META_KEYS and isinstance(v, dict):
            meta.update(v)
        else:
            meta[k] = v
    rows = data[rows_key] if rows_key is not None else []
    return pd.json_normalize(rows) if rows else pd.DataFrame(), meta


# --------------------------------------------------------------------------------------------------
# throughput and memory (CPU, small scale)
# --------------------------------------------------------------------------------------------------


def dense_cache_bytes(cache) -> int:
    """Bytes held by the key/value tensors of a transformers cache (e.g. ``DynamicCache``)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _cache_bytes(cache) -> int:
    """Bytes a cache holds: ``MustafarCache.nbytes()`` (buffers at capacity) or the dense tensors."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    return dense_cache_bytes(cache)


def _new_cache(model, config, max_cache_len: int | None = None):
    from transformers import DynamicCache

    if config is None:
        return DynamicCache(config=model.config)
    from mustafar.cache import MustafarCache

    return MustafarCache(model, config, max_cache_len=max_cache_len)


@torch.inference_mode()
def decode_throughput(model, batch: int, prompt_len: int, new_tokens: int, config=None, seed: int = 0,
                      warmup: int = 2, prefill: str = "random") -> dict:
    """Greedy decode of ``new_tokens`` tokens after a ``prompt_len``-token context; only the decode
    steps are timed.

    Parameters
    ----------
    model : a transformers causal LM (on CPU here).
    batch, prompt_len, new_tokens : ints >= 1.
    config : ``None`` for a ``DynamicCache`` (dense), else a ``mustafar.cache.MustafarConfig``.
    warmup : decode steps run (and not timed) before timing.
    prefill : ``"random"`` (default): every layer's cache receives random ``K, V [B, H_kv, T, D]``
        through its normal multi-token ``update`` (what a prefill does; decode speed depends only on
        the shapes, and this skips the prefill matmuls that dominate a CPU run); ``"model"``: a real
        prefill forward of random token ids.

    Returns
    -------
    dict with ``cache, batch, prompt_len, new_tokens, decode_s, tokens_per_s, ms_per_step, cache_bytes``.
    """
    for name, val in (("batch", batch), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if prefill not in ("random", "model"):
        raise ValueError(f"prefill must be 'random' or 'model', got {prefill!r}")
    g = torch.Generator().manual_seed(seed)
    cache = _new_cache(model, config, prompt_len + warmup + new_tokens + 1)
    if prefill == "model":
        ids = torch.randint(10, model.config.vocab_size - 10, (batch, prompt_len), generator=g)  # [B, T]
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)  # [B, 1]
    else:
        n_layers, h_kv, d, dtype = kv_geometry(model)
        for li in range(n_layers):
            k = torch.randn(batch, h_kv, prompt_len, d, generator=g).to(dtype)  # [B, H_kv, T, D]
            v = torch.randn(batch, h_kv, prompt_len, d, generator=g).to(dtype)
            cache.update(k, v, li)
        nxt = torch.randint(10, model.config.vocab_size - 10, (batch, 1), generator=g)  # [B, 1]
    for _ in range(warmup):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    dt = time.perf_counter() - t0
    return {
        "cache": "dense" if config is None else "mustafar",
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "decode_s": dt,
        "tokens_per_s": batch * new_tokens / dt,
        "ms_per_step": 1e3 * dt / new_tokens,
        "cache_bytes": _cache_bytes(cache),
    }


def kv_geometry(model) -> tuple[int, int, int, torch.dtype]:
    """(layers, H_kv, D, dtype) of a decoder-only transformers model."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    h_q = cfg.num_attention_heads
    h_kv = getattr(cfg, "num_key_value_heads", None) or h_q
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // h_q
    return cfg.num_hidden_layers, h_kv, d, next(model.parameters()).dtype


@torch.inference_mode()
def cache_memory(model, contexts: Sequence[int], config=None, batch: int = 1, seed: int = 0):
    """KV-cache bytes after a prefill of ``T`` tokens, for each ``T`` in ``contexts``.

    No forward pass is run: memory depends only on shapes, so every layer's cache receives random
    ``K, V [B, H_kv, T, D]`` (model dtype) through its normal multi-token ``update`` (what a prefill
    does). That makes long contexts cheap on a CPU.

    Parameters
    ----------
    model : transformers causal LM (its config and dtype give the cache geometry).
    contexts : prompt lengths ``T``.
    config : ``None`` for ``DynamicCache``, else a ``MustafarConfig`` (``max_cache_len = T``).
    batch : int >= 1.

    Returns
    -------
    DataFrame with columns ``cache, context, cache_bytes, dense_bytes, ratio`` (``ratio`` =
    cache bytes / the dense cache's bytes for the same tokens).
    """
    import pandas as pd

    n_layers, h_kv, d, dtype = kv_geometry(model)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t in contexts:
        t = int(t)
        if t < 1:
            raise ValueError(f"contexts must be positive ints, got {t!r}")
        cache = _new_cache(model, config, t)
        for li in range(n_layers):
            k = torch.randn(batch, h_kv, t, d, generator=g).to(dtype)  # [B, H_kv, T, D]
            v = torch.randn(batch, h_kv, t, d, generator=g).to(dtype)
            cache.update(k, v, li)
        dense = 2 * n_layers * batch * h_kv * t * d * torch.empty((), dtype=dtype).element_size()
        got = _cache_bytes(cache)
        rows.append({"cache": "dense" if config is None else "mustafar", "context": t,
                     "cache_bytes": got, "dense_bytes": dense, "ratio": got / dense})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# accuracy sweep (mustafar.eval)
# --------------------------------------------------------------------------------------------------


def accuracy_missing(results: dict, profile: str, model: str = "smollm2-135m", seed: int = 0,
                     suites: Sequence[str] = ("ruler", "ppl")) -> list[tuple]:
    """Cells of ``profile`` (``mustafar.eval.sweep.PROFILES``) a results dict lacks.

    Cells are compared with ``mustafar.eval.sweep.cell_key`` (every parameter of a cell: model, suite,
    task, context length, samples, seed, every spec field), exactly as the sweep's own resume does.
    LongBench is not checked (it runs only where its data files are supplied).

    Returns
    -------
    list of the missing ``(suite, task, context_length, config)`` tuples (empty: complete).
    """
    from mustafar.eval import sweep

    if profile not in sweep.PROFILES:
        raise ValueError(f"unknown profile {profile!r}; available: {list(sweep.PROFILES)}")
    prof = sweep.PROFILES[profile]
    have = {sweep.cell_key(c) for c in results.get("cells", [])}
    missing = []
    for spec in sweep.profile_specs(profile):
        want = []
        if "ruler" in suites:
            want += [dict(suite="ruler", task=t, context_length=int(n), n_samples=int(prof["ruler_samples"]))
                     for n in prof["ruler_lengths"] for t in prof["ruler_tasks"]]
        if "ppl" in suites:
            pp = prof["ppl"]
            want.append(dict(suite="ppl", task="prose_ppl", context_length=int(pp["prefill_tokens"]),
                             n_samples=int(pp["n_segments"]), eval_tokens=pp["eval_tokens"], n_segments=pp["n_segments"]))
        for w in want:
            cell = dict(model=model, seed=seed, **w, **spec.to_dict())
            if sweep.cell_key(cell) not in have:
                missing.append((w["suite"], w["task"], w["context_length"], spec.name))
    return missing


def accuracy_results(model: str = "smollm2-135m", profile: str = "quick", run_missing: bool = True,
                     out_dir: str | os.PathLike | None = None) -> tuple[dict, str]:
    """The accuracy sweep of ``model`` for ``profile``: loaded from ``results/accuracy_<model>.json``
    when that file already holds every cell of the profile, otherwise run (resuming what is there)
    with ``mustafar.eval.run_sweep`` when ``run_missing``.

    Returns
    -------
    (results dict with a ``cells`` list, status line saying what happened).
    """
    from mustafar.eval import run_sweep, sweep

    out = Path(out_dir) if out_dir is not None else results_dir()
    path = out / f"accuracy_{model.replace('/', '_')}.json"
    results = sweep.load_results(path)
    missing = accuracy_missing(results, profile, model)
    if not missing:
        return results, f"loaded {path} ({len(results['cells'])} cells; complete for profile {profile!r})"
    if not run_missing:
        return results, f"{path}: {len(missing)} cells of profile {profile!r} missing and run_missing=False"
    n_before = len(missing)
    results = run_sweep(model=model, profile=profile, out_dir=out, resume=True,
                        command=f"mustafar.analysis.accuracy_results({model!r}, {profile!r})")
    return results, f"ran mustafar.eval.run_sweep(profile={profile!r}): {n_before} missing cells computed -> {path}"


def accuracy_table(results: dict, profile: str | None = None):
    """One row per configuration: group, strategies, sparsities, mode, fp16 bytes ratio, mean score
    over the RULER (and LongBench) cells (``avg``, %), and prose perplexity (``ppl``).

    Config names are rebuilt from each cell's spec fields (``CacheSpec(...).name``), as
    ``mustafar.eval.summarize`` does, so they match its tables even across renames; with ``profile``
    only the cells made with that profile's settings are used.

    Returns
    -------
    DataFrame indexed by ``config``.
    """
    import pandas as pd
    from mustafar.eval import sweep
    from mustafar.eval.runtime import CacheSpec

    cells = list(results.get("cells", []))
    if profile is not None:
        prof = (results.get("profiles") or {}).get(profile) or sweep.PROFILES.get(profile)
        in_profile = getattr(sweep, "_in_profile", None)
        if prof is not None and in_profile is not None:
            cells = [c for c in cells if in_profile(c, prof)]
    if not cells:
        return pd.DataFrame()
    df = pd.DataFrame(cells)
    df["config"] = [CacheSpec(**{f: c.get(f) for f in sweep._SPEC_FIELDS if c.get(f) is not None}).name for c in cells]
    keys = [k for k in ("group", "mode", "k_strategy", "v_strategy", "k_sparsity", "v_sparsity", "bytes_ratio")
            if k in df.columns]
    meta = df.groupby("config")[keys].first()
    scored = df[df["suite"] != "ppl"]
    meta["avg"] = scored.groupby("config")["score"].mean() if not scored.empty else float("nan")
    meta["ppl"] = (df[df["suite"] == "ppl"].groupby("config")["ppl"].mean() if "ppl" in df.columns
                   else float("nan"))
    order = {"dense": 0, "K-only": 1, "V-only": 2, "joint": 3, "asymmetric": 4}
    meta["_o"] = meta["group"].map(order).fillna(9)
    return meta.sort_values(["_o", "k_strategy", "k_sparsity", "v_sparsity"]).drop(columns="_o")


def strategy_label(row) -> str:
    """Short label of a configuration's strategy (the K strategy, else the V strategy)."""
    if row.get("k_sparsity", 0) and row.get("k_sparsity", 0) > 0:
        return str(row.get("k_strategy"))
    if row.get("v_sparsity", 0) and row.get("v_sparsity", 0) > 0:
        return str(row.get("v_strategy"))
    return "dense"


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


def kernel_long_frame(df, sparsity: float = 0.7, dtype: str = "float16"):
    """Recorded GPU kernel rows (``results/kernel_h200.json``) -> long form for bar plots.

    Returns
    -------
    DataFrame with columns ``shape`` (e.g. ``"H32/8 B=8 T=16K"``), ``kernel`` (``dense SDPA``,
    ``fused v4``, ``fused v5``, ``fused v6``, ``fused v6g`` (each CUDA kernel the run timed; ``fused sparse`` for runs
    that timed only the default one), ``unfused (decode + SDPA)``, ``byte floor (fused)``) and ``ms``.
    """
    import pandas as pd

    sub = df
    if "sparsity" in df.columns:
        sub = sub[(sub["sparsity"] - sparsity).abs() < 1e-9]
    if "dtype" in df.columns:
        sub = sub[sub["dtype"] == dtype]
    per_kernel = {c: f"fused {c[6:-3]}" for c in ("fused_v4_ms", "fused_v5_ms", "fused_v6_ms", "fused_v6g_ms")
                  if c in sub.columns and sub[c].notna().any()}
    fused = per_kernel or {"fused_ms": "fused sparse"}
    cols = {"dense_ms": "dense SDPA", **fused, "unfused_ms": "unfused (decode + SDPA)",
            "fused_floor_ms": "byte floor (fused)"}
    rows = []
    for _, r in sub.iterrows():
        t = int(r["T"])
        shape = f"H{int(r['H_q'])}/{int(r['H_kv'])} B={int(r['B'])} T={t // 1024}K" if t >= 1024 else f"B={int(r['B'])} T={t}"
        for c, name in cols.items():
            if c in r and pd.notna(r[c]):
                rows.append({"shape": shape, "kernel": name, "ms": float(r[c])})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# recorded e2e grid (results/e2e_grid_h200.json: python -m mustafar.bench.e2e --grid --longest)
# --------------------------------------------------------------------------------------------------

#: display order of the caches of the e2e grid (labels from :func:`e2e_cache_label`); also the
#: colour order of the notebook's figures (``plotting.plot_lines(..., order=E2E_CACHE_ORDER)`` gives a
#: cache the same colour in every panel and figure, StaticCache last so that figures without it agree).
E2E_CACHE_ORDER = ("dense DynamicCache", "mustafar 50%", "mustafar 70%", "dense StaticCache")


def read_results_json(name_or_path: str | os.PathLike) -> dict:
    """A results JSON as the parsed object itself (for files whose parts are not one row list, such
    as the e2e grid's ``grid`` / ``derived`` / ``best`` / ``longest`` ...).

    Parameters
    ----------
    name_or_path : a file under ``results/`` (``"e2e_grid_h200"``) or a path.

    Returns
    -------
    dict. Raises ``FileNotFoundError`` if the file does not exist.
    """
    p = _results_file(name_or_path)
    data = json.loads(p.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(data).__name__}")
    return data


def provenance_brief(raw: dict) -> dict:
    """``{"device", "commit", "date"}`` of a results dict's ``provenance`` block (the commit read by
    ``mustafar.provenance.commit_of``; None for what the block lacks), e.g. for
    ``plotting.annotate_provenance``."""
    from mustafar.provenance import commit_of

    prov = raw.get("provenance") or {}
    return {"device": prov.get("device"), "commit": commit_of(prov), "date": prov.get("date")}


def provenance_line(raw: dict, name: str = "") -> str:
    """``"<name>: device ..., commit ..., date ..."`` from :func:`provenance_brief` (``?`` for what
    the provenance block lacks)."""
    brief = provenance_brief(raw)
    return (f"{name}: " if name else "") + ", ".join(f"{k} {brief[k] or '?'}" for k in ("device", "commit", "date"))


def e2e_cache_label(cache: str, sparsity: float | None = None) -> str:
    """Display name of an e2e cache kind: ``dense`` -> ``dense DynamicCache``, ``static`` ->
    ``dense StaticCache``, ``compressed`` at sparsity ``s`` -> ``mustafar 70%``."""
    if cache == "dense":
        return "dense DynamicCache"
    if cache == "static":
        return "dense StaticCache"
    if cache in ("compressed", "mustafar"):
        if sparsity is None:
            raise ValueError("a compressed cache needs its sparsity")
        return f"mustafar {float(sparsity):.0%}"
    raise ValueError(f"unknown e2e cache kind {cache!r}")


def _e2e_order(raw: dict, models=None) -> tuple[list, list]:
    """Models and ``(P, G)`` pairs in the order of the file's settings (then any others, sorted)."""
    settings = raw.get("settings") or {}
    rows = list(raw.get("derived") or []) + list(raw.get("best") or [])
    models_seen = list(dict.fromkeys(r["model"] for r in rows))
    models = list(dict.fromkeys([*(settings.get("models") or []), *models_seen])) if models is None else list(models)
    models = [m for m in models if m in models_seen]
    pairs = []
    for txt in settings.get("ratios") or []:
        p, g = (int(x) for x in str(txt).split(":"))
        pairs.append((p, g))
    for r in rows:
        if (r["prompt"], r["gen"]) not in pairs:
            pairs.append((r["prompt"], r["gen"]))
    return models, pairs


def _cache_rank(label: str) -> int:
    return E2E_CACHE_ORDER.index(label) if label in E2E_CACHE_ORDER else len(E2E_CACHE_ORDER)


def e2e_best_table(raw: dict):
    """The grid's ``best`` entries (best tokens/s under the KV budget per model, prompt P, generated
    G and cache) as a table, with the speed-ups over the file's dense baseline.

    The baseline is the dense cache of the file (``dense``: DynamicCache, or ``static``: StaticCache;
    ``dense`` if both). The ratios are computed here from the table's own tokens/s
    (``best / best of the baseline`` and ``tokens/s at batch 8 / the baseline's at batch 8``); they
    equal the ``best_over_best_<baseline>`` / ``at_batch_8_over_<baseline>`` that
    ``mustafar.bench.e2e.derive`` stores with each compressed entry.

    Parameters
    ----------
    raw : a parsed ``mustafar.bench.e2e --grid`` results dict (:func:`read_results_json`).

    Returns
    -------
    DataFrame with columns ``model, P:G, prompt, gen, cache`` (label of :func:`e2e_cache_label`),
    ``best_tok_per_s, best_batch, max_batch, kv_gib_at_best, tok_per_s_at_batch_8,
    best_over_best_<baseline>, at_batch_8_over_<baseline>`` (NaN on the baseline's own rows and
    where a batch-8 row is missing); ordered by model, the file's P:G pairs, the baseline, then
    :data:`E2E_CACHE_ORDER`. ``attrs["baseline"]`` is ``"dense"`` or ``"static"``.
    """
    import pandas as pd

    best = list(raw.get("best") or [])
    if not best:
        return pd.DataFrame()
    kinds = {e["cache"] for e in best}
    base = "dense" if "dense" in kinds else ("static" if "static" in kinds else None)
    models, pairs = _e2e_order(raw)
    rows = []
    for e in best:
        at8 = float(e["tok_per_s_at_batch_8"]) if e.get("tok_per_s_at_batch_8") is not None else float("nan")
        rows.append({"model": e["model"], "P:G": f"{e['prompt']}:{e['gen']}", "prompt": int(e["prompt"]),
                     "gen": int(e["gen"]), "cache": e2e_cache_label(e["cache"], e.get("sparsity")),
                     "kind": e["cache"], "best_tok_per_s": float(e["best_tok_per_s"]),
                     "best_batch": int(e["best_batch"]), "max_batch": int(e["max_batch"]),
                     "kv_gib_at_best": e.get("kv_gib_at_best"), "tok_per_s_at_batch_8": at8})
    df = pd.DataFrame(rows)
    r_best, r_8 = f"best_over_best_{base}", f"at_batch_8_over_{base}"
    df[r_best] = float("nan")
    df[r_8] = float("nan")
    if base is not None:
        ref = df[df["kind"] == base].set_index(["model", "prompt", "gen"])
        for i, r in df.iterrows():
            key = (r["model"], r["prompt"], r["gen"])
            if r["kind"] == base or key not in ref.index:
                continue
            d = ref.loc[key]
            df.loc[i, r_best] = r["best_tok_per_s"] / d["best_tok_per_s"]
            df.loc[i, r_8] = r["tok_per_s_at_batch_8"] / d["tok_per_s_at_batch_8"]
    df["_m"] = df["model"].map({m: i for i, m in enumerate(models)})
    df["_p"] = [pairs.index((p, g)) for p, g in zip(df["prompt"], df["gen"])]
    df["_c"] = [0 if k == base else 1 + _cache_rank(c) for k, c in zip(df["kind"], df["cache"])]  # baseline first
    df = df.sort_values(["_m", "_p", "_c"]).drop(columns=["_m", "_p", "_c", "kind"]).reset_index(drop=True)
    df.attrs["baseline"] = base
    return df


def e2e_targets(best, model: str = "llama2-7b", prompt: int = 4096, batch_8_target: float = 1.4,
                best_target: float = 2.0):
    """The GPU issue's end-to-end targets, judged from an :func:`e2e_best_table`: for ``model`` at
    ``prompt`` tokens, MustafarCache's tokens/s at batch 8 over the dense baseline's (target
    ``>= batch_8_target``) and its best tokens/s under the KV budget over the baseline's best
    (target ``>= best_target``).

    Returns
    -------
    DataFrame, one row per MustafarCache entry of that model and prompt: ``model, P:G, cache,
    baseline`` (``DynamicCache`` / ``StaticCache``), ``at_batch_8_over_dense``, ``batch_8_target``,
    ``batch_8_met``, ``best_over_best_dense``, ``best_target``, ``best_met`` (``"met"`` / ``"not met"``;
    ``"n/a"`` where a ratio is missing). Empty if the table has no such entry.
    """
    import pandas as pd

    if best is None or len(best) == 0:
        return pd.DataFrame()
    base = best.attrs.get("baseline") or next(c[len("best_over_best_"):] for c in best.columns
                                              if c.startswith("best_over_best_"))
    name = {"dense": "DynamicCache", "static": "StaticCache"}.get(base, str(base))
    sub = best[(best["model"] == model) & (best["prompt"] == int(prompt)) & best["cache"].str.startswith("mustafar")]

    def verdict(x, target):
        return "n/a" if x is None or not math.isfinite(float(x)) else ("met" if float(x) >= target else "not met")

    rows = []
    for _, r in sub.iterrows():
        b8, bb = r[f"at_batch_8_over_{base}"], r[f"best_over_best_{base}"]
        rows.append({"model": r["model"], "P:G": r["P:G"], "cache": r["cache"], "baseline": name,
                     "at_batch_8_over_dense": b8, "batch_8_target": f">= {batch_8_target:.1f}x",
                     "batch_8_met": verdict(b8, batch_8_target),
                     "best_over_best_dense": bb, "best_target": f">= {best_target:.1f}x",
                     "best_met": verdict(bb, best_target)})
    return pd.DataFrame(rows)


def e2e_tokens_vs_batch(*raws: dict):
    """Long form of the grids' ``derived`` rows (tokens/s over the G generated tokens per model,
    P, G, batch and cache) for a tokens/s-vs-batch figure.

    Several files can be given (e.g. the DynamicCache grid and the StaticCache one): their rows are
    concatenated and, where two files hold the same (model, P, G, cache, batch), the first file's
    row is kept (``source`` says which file, by position).

    Returns
    -------
    DataFrame with columns ``model, P:G, prompt, gen, batch, cache`` (label), ``tok_per_s,
    step_ms_mean, kv_gib, source``; ordered by model, the first file's P:G pairs, cache, batch.
    ``attrs["models"]`` and ``attrs["pairs"]`` give the panel order.
    """
    import pandas as pd

    rows, models, pairs = [], [], []
    for i, raw in enumerate(raws):
        if raw is None:
            continue
        ms, ps = _e2e_order(raw)
        models += [m for m in ms if m not in models]
        pairs += [p for p in ps if p not in pairs]
        for d in raw.get("derived") or []:
            rows.append({"model": d["model"], "P:G": f"{d['prompt']}:{d['gen']}", "prompt": int(d["prompt"]),
                         "gen": int(d["gen"]), "batch": int(d["batch"]),
                         "cache": e2e_cache_label(d["cache"], d.get("sparsity")),
                         "tok_per_s": float(d["tok_per_s"]), "step_ms_mean": d.get("step_ms_mean"),
                         "kv_gib": d.get("kv_gib"), "source": i})
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows).drop_duplicates(["model", "prompt", "gen", "cache", "batch"], keep="first")
    df["_m"] = df["model"].map({m: i for i, m in enumerate(models)})
    df["_p"] = [pairs.index((p, g)) for p, g in zip(df["prompt"], df["gen"])]
    df["_c"] = df["cache"].map(_cache_rank)
    df = df.sort_values(["_m", "_p", "_c", "batch"]).drop(columns=["_m", "_p", "_c"]).reset_index(drop=True)
    df.attrs["models"], df.attrs["pairs"] = models, [f"{p}:{g}" for p, g in pairs]
    return df


def e2e_longest_table(raw: dict):
    """The grid's ``longest`` rows: the longest context (tokens, a multiple of 1024) whose batch-1
    cache fits the KV budget, per model and cache, with its KV GiB and the decode step there.

    Returns
    -------
    DataFrame with columns ``model, cache, context, context_over_dense`` (over the same model's
    DynamicCache context), ``kv_gib, budget_gib, gpu_busy_ms, tok_per_s`` (batch 1, from the step
    time of ``time_source``), ``time_source``, ``oom_steps_down`` (contexts that ran out of memory
    first); rows that failed carry ``error``/``note`` instead of numbers.
    """
    import pandas as pd

    rows = []
    for r in raw.get("longest") or []:
        row = {"model": r["model"], "cache": e2e_cache_label(r["cache"], r.get("sparsity")),
               "context": int(r.get("context") or 0),
               "kv_gib": r.get("kv_gib"), "budget_gib": r.get("budget_gib"), "gpu_busy_ms": r.get("gpu_busy_ms"),
               "tok_per_s": r.get("tok_per_s"), "time_source": r.get("time_source"),
               "oom_steps_down": len(r.get("oom_steps_down") or [])}
        if r.get("error") or r.get("note"):
            row["problem"] = r.get("error") or r.get("note")
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    dense = df[df["cache"] == "dense DynamicCache"].set_index("model")["context"]
    df.insert(3, "context_over_dense", [c / dense[m] if m in dense.index and dense[m] else float("nan")
                                        for m, c in zip(df["model"], df["context"])])
    models = list(dict.fromkeys(df["model"]))
    df["_m"], df["_c"] = df["model"].map({m: i for i, m in enumerate(models)}), df["cache"].map(_cache_rank)
    return df.sort_values(["_m", "_c"]).drop(columns=["_m", "_c"]).reset_index(drop=True)


def e2e_linearity_table(raw: dict):
    """The grid's check that a decode step's time is affine in the context: at the midpoint
    configuration (``--midpoint P:G:B``) the step time measured at ``P + G/2`` against the mean of
    those at ``P`` and ``P + G`` (what the tokens/s derivation assumes).

    Returns
    -------
    DataFrame with columns ``model, cache, batch, prompt, gen, context, measured_ms,
    interpolated_ms, rel_error_pct`` (``100 * (interpolated - measured) / measured``).
    """
    import pandas as pd

    rows = [{"model": m["model"], "cache": e2e_cache_label(m["cache"], m.get("sparsity")), "batch": int(m["batch"]),
             "prompt": int(m["prompt"]), "gen": int(m["gen"]), "context": int(m["context"]),
             "measured_ms": float(m["measured_ms"]), "interpolated_ms": float(m["interpolated_ms"]),
             "rel_error_pct": 100.0 * float(m["rel_error"])}
            for m in (raw.get("linearity") or {}).get("midpoint") or []]
    return pd.DataFrame(rows)


def e2e_fit_residuals(raw: dict):
    """Per model and cache: over every (batch) sweep with three or more measured contexts, the
    largest relative residual of the least-squares line through its step times (``linearity.fits``).

    Returns
    -------
    DataFrame with columns ``model, cache, sweeps, max_rel_residual_pct, at_batch``.
    """
    import pandas as pd

    fits = (raw.get("linearity") or {}).get("fits") or []
    rows = {}
    for f in fits:
        key = (f["model"], e2e_cache_label(f["cache"], f.get("sparsity")))
        res = 100.0 * float(f["max_rel_residual"])
        cur = rows.setdefault(key, {"model": key[0], "cache": key[1], "sweeps": 0, "max_rel_residual_pct": -1.0,
                                    "at_batch": None})
        cur["sweeps"] += 1
        if res > cur["max_rel_residual_pct"]:
            cur["max_rel_residual_pct"], cur["at_batch"] = res, int(f["batch"])
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(list(rows.values()))
    models = list(dict.fromkeys(df["model"]))
    df["_m"], df["_c"] = df["model"].map({m: i for i, m in enumerate(models)}), df["cache"].map(_cache_rank)
    return df.sort_values(["_m", "_c"]).drop(columns=["_m", "_c"]).reset_index(drop=True)


def e2e_cycle_table(raw: dict):
    """MustafarCache's measured window cycle (``window_cycles``): per model, sparsity and batch the
    GPU-busy step with a full window, the compressing step and the step after it, and the two
    extras the tokens/s derivation adds per step: ``window_extra_ms = (full - after) / 2`` (the
    window's mean size) and ``compress_extra_ms_per_token = (compressing - after) / compress_chunk``.

    Returns
    -------
    DataFrame with columns ``model, cache, batch, full_ms, compress_ms, empty_ms, window_extra_ms,
    compress_extra_ms_per_token, schedule_ok``.
    """
    import pandas as pd

    rows = []
    for c in raw.get("window_cycles") or []:
        chunk = int(c.get("compress_chunk") or 256)
        full, comp, empty = float(c["full_ms"]), float(c["compress_ms"]), float(c["empty_ms"])
        rows.append({"model": c["model"], "cache": e2e_cache_label("compressed", c["sparsity"]), "batch": int(c["batch"]),
                     "full_ms": full, "compress_ms": comp, "empty_ms": empty, "window_extra_ms": 0.5 * (full - empty),
                     "compress_extra_ms_per_token": (comp - empty) / chunk, "schedule_ok": bool(c.get("schedule_ok"))})
    return pd.DataFrame(rows)


def e2e_token_checks(raw: dict):
    """Greedy tokens of ``mode="compressed"`` vs ``mode="simulate"`` (``checks`` of an e2e results
    file, ``mustafar.bench.e2e.token_check``), one row per model, dtype and sequence.

    Returns
    -------
    DataFrame with columns ``model, dtype, sequence, new_tokens, leading_tokens_equal,
    first_difference`` (position, or None when all tokens agree), ``top1_minus_top2`` (the simulate
    run's margin there), ``max_logit_diff_so_far`` (largest logit difference between the two runs up
    to there: the rounding noise) and ``margin_within_noise`` (``top1_minus_top2 <=
    max_logit_diff_so_far``: a flip of a near-tie by rounding; None where nothing differs).
    """
    import pandas as pd

    rows = []
    for c in raw.get("checks") or []:
        firsts = c.get("first_difference") or [None] * len(c["leading_tokens_equal"])
        for i, (lead, fd) in enumerate(zip(c["leading_tokens_equal"], firsts)):
            margin = fd["simulate_top1_minus_top2"] if fd else None
            noise = fd["max_logit_diff_up_to_here"] if fd else None
            rows.append({"model": c.get("model"), "dtype": c.get("dtype"), "sequence": i,
                         "new_tokens": int(c["new_tokens"]), "leading_tokens_equal": int(lead),
                         "first_difference": fd["position"] if fd else None, "top1_minus_top2": margin,
                         "max_logit_diff_so_far": noise,
                         "margin_within_noise": (margin <= noise) if fd else None})
    df = pd.DataFrame(rows)
    if not df.empty:
        df["first_difference"] = df["first_difference"].astype("Int64")  # positions stay integers beside None
    return df
