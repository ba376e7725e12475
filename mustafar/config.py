"""``MustafarConfig``: how a :class:`mustafar.MustafarCache` prunes and stores K and V (fields and validation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real

import torch

from mustafar.pruning import kept_count
from mustafar.ops.dispatch import DECODE_KERNELS
from mustafar.pruning import STRATEGIES

__all__ = ["MustafarConfig", "MODES", "QUERY_STRATEGIES"]

MODES = ("compressed", "simulate")
# How stored (pruned) values are kept: in the model's dtype, or FP8 e4m3 with a float16 scale per token vector.
_VALUE_DTYPES = {"model": None, "fp8_e4m3": torch.float8_e4m3fn}
# Strategies with a fixed number of kept values per token vector (what the fixed-stride format needs);
# output_aware joins them with granularity="per_token".
_FIXED_BUDGET = ("per_token_magnitude", "semi_structured_2_4", "think")
# Query-driven strategies: scored with the queries the "mustafar" attention function hands to the cache.
QUERY_STRATEGIES = ("output_aware", "think")
# Their options a MustafarConfig may set (q / k / attn are supplied by the cache).
_QUERY_KWARGS = {"output_aware": ("granularity", "window", "group_size", "kind"), "think": ("obs_window", "kind")}


@dataclass
class MustafarConfig:
    """How a :class:`mustafar.MustafarCache` prunes and stores K and V.

    Parameters
    ----------
    k_sparsity, v_sparsity : float in [0, 1)
        Fraction of each token vector pruned (``n = floor(s*D + 0.5)`` entries zeroed).
    k_strategy, v_strategy : str
        A key of :data:`mustafar.pruning.STRATEGIES`. Default ``"per_token_magnitude"`` (the paper).
        ``mode="compressed"`` needs a fixed kept count per token vector: ``per_token_magnitude``,
        ``semi_structured_2_4`` (sparsity 0.5), ``think`` (K only) or ``output_aware`` with
        ``granularity="per_token"``. Others (``per_channel_magnitude``, output-aware per channel) need
        ``mode="simulate"``. The query-driven strategies (``output_aware``, ``think``) are scored with the
        post-RoPE queries the ``"mustafar"`` attention function hands to the cache.
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
    decode_kernel : str
        Which decode kernel :func:`mustafar.ops.sparse_decode` runs for layers on CUDA (one of
        :data:`mustafar.ops.dispatch.DECODE_KERNELS`; ``"auto"``: the op's rule for the shape). Passed as
        the op's explicit ``kernel`` argument at every compressed decode step; layers on the CPU run the
        one C++ kernel (``"auto"``) whatever is set here.
    k_value_dtype, v_value_dtype : ``"model"`` | ``"fp8_e4m3"``
        How the K / V side's kept values are stored: ``"model"`` (default) in the model's dtype;
        ``"fp8_e4m3"`` as float8_e4m3fn with a float16 scale per token vector
        (:func:`mustafar.format.quantize_fp8`; ``8*W + k + 2`` bytes per token vector). Both modes
        accept it: ``"compressed"`` stores the FP8 values, ``"simulate"`` applies the same quantization
        to its pruned dense rows. :meth:`value_dtype` gives the torch dtype.
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
    decode_kernel: str = "auto"
    k_value_dtype: str = "model"
    v_value_dtype: str = "model"

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
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        if self.decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel={self.decode_kernel!r}: expected one of {', '.join(DECODE_KERNELS)}")
        for name in ("k_value_dtype", "v_value_dtype"):
            vd = getattr(self, name)
            if not isinstance(vd, str) or vd not in _VALUE_DTYPES:
                raise ValueError(f"{name}={vd!r}: expected one of {', '.join(map(repr, _VALUE_DTYPES))}")
        for which in ("k", "v"):
            strat = getattr(self, f"{which}_strategy")
            kw = getattr(self, f"{which}_strategy_kwargs")
            if strat not in STRATEGIES:
                raise ValueError(f"{which}_strategy={strat!r} unknown; available: {sorted(STRATEGIES)}")
            if not isinstance(kw, dict):
                raise ValueError(f"{which}_strategy_kwargs={kw!r} must be a dict")
            if strat in QUERY_STRATEGIES:
                self._check_query_kwargs(which, strat, kw)
            if self.mode == "compressed" and not self.fixed_budget(which):
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

    def fixed_budget(self, which: str) -> bool:
        """Whether the ``which`` (``"k"``/``"v"``) side keeps a fixed number of values per token vector."""
        strat = getattr(self, f"{which}_strategy")
        if strat == "output_aware":
            return getattr(self, f"{which}_strategy_kwargs").get("granularity", "per_token") == "per_token"
        return strat in _FIXED_BUDGET

    def needs_queries(self, which: str) -> bool:
        """Whether the ``which`` (``"k"``/``"v"``) side prunes with a query-driven strategy (sparsity > 0)."""
        return getattr(self, f"{which}_strategy") in QUERY_STRATEGIES and getattr(self, f"{which}_sparsity") > 0.0

    def kept(self, which: str, head_dim: int) -> int:
        """Values stored per token vector of K (``which="k"``) or V in compressed mode (:func:`mustafar.format.kept_count`)."""
        return kept_count(head_dim, getattr(self, f"{which}_sparsity"))  # 2:4 at 0.5 keeps D/2 == kept_count(D, 0.5)

    def value_dtype(self, which: str) -> torch.dtype | None:
        """Stored-value dtype of the ``which`` (``"k"``/``"v"``) side: ``torch.float8_e4m3fn`` for
        ``"fp8_e4m3"``, ``None`` for ``"model"`` (the model's dtype)."""
        if which not in ("k", "v"):
            raise ValueError(f"which={which!r}: expected 'k' or 'v'")
        return _VALUE_DTYPES[getattr(self, f"{which}_value_dtype")]
