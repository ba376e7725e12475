"""The methods of the peers comparison (:class:`PeerSpec`), the profiles, and which methods this
environment can run.

Byte targets: ``keep`` = MUSTAFAR's fp16 byte ratio at 50 % / 70 % sparsity for the model's head_dim
(:func:`mustafar.format.format_bytes_ratio`; D=64 and D=256: 0.5625 / 0.359-0.363) and 0.2; a kvpress
press runs at compression ratio ``1 - keep`` (the fraction of context tokens evicted).
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

__all__ = ["PeerSpec", "PRESSES", "QUANT", "PROFILES", "keep_ratios", "profile_specs", "unavailable"]

#: kvpress presses (name used here -> kvpress class). ObservedAttention is kvpress's H2O-style press.
PRESSES = {"SnapKV": "SnapKVPress", "ExpectedAttention": "ExpectedAttentionPress", "KNorm": "KnormPress",
           "StreamingLLM": "StreamingLLMPress", "TOVA": "TOVAPress", "ObservedAttention": "ObservedAttentionPress"}
#: quantized caches: (method, bits). quanto / hqq: transformers' QuantizedCache layers (peers env,
#: transformers 5.2); fp8: ours, e4m3 with one fp16 scale per token vector (any env); qc-fp8:
#: transformers' own QuantizedCache(backend="fp8") (per-tensor scale; transformers >= 5.2x, main env).
QUANT = (("quanto", 4), ("quanto", 2), ("hqq", 4), ("hqq", 2), ("fp8", 8), ("qc-fp8", 8))

#: RULER-style cells of a profile: the accuracy suite's tasks (dense SmolLM2 is above chance on them),
#: context lengths, samples per (task, length) cell (sample ``i`` = the suite's sample ``i``) and the
#: lengths at which the question-in-context variant runs too (``qic_lengths``; the full profile's 2K
#: cells run kvpress's standard pipeline only, to fit the compute budget). ``gemma3-core``: the core
#: table on Gemma 3 270M (1K, standard pipeline; the three tasks where its dense score is above zero
#: and whose answers are short: a base model, see the README).
PROFILES = {
    "tiny": dict(tasks=("niah_single",), lengths=(256,), samples=1, qic_lengths=(256,)),
    "quick": dict(tasks=("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "fwe"),
                  lengths=(1024,), samples=2, qic_lengths=(1024,)),
    "full": dict(tasks=("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "fwe"),
                 lengths=(1024, 2048), samples=3, qic_lengths=(1024,)),
    "gemma3-core": dict(tasks=("niah_single", "niah_multikey", "fwe"), lengths=(1024,), samples=3, qic_lengths=()),
}


@dataclass(frozen=True)
class PeerSpec:
    """One method of the peers runner.

    family : ``dense`` | ``kvpress`` | ``quant`` | ``mustafar`` | ``joint``.
    method : press name (``PRESSES``), ``quanto``/``hqq``/``fp8``/``qc-fp8``, ``tok`` (MUSTAFAR
        per-token magnitude), ``tok+kivi``, ``tok+fp8`` or ``h2o+tok`` (joint).
    ratio : kvpress compression ratio (fraction of tokens evicted; joint h2o+tok: of the H2O step).
    sparsity : MUSTAFAR per-token sparsity (mustafar, joint).
    nbits : quantization bits (quant, joint tok+kivi).
    qic : question in the compressed prompt (``True``) or kvpress's standard pipeline (``False``).
    """

    family: str
    method: str = ""
    ratio: float = 0.0
    sparsity: float = 0.0
    nbits: int = 0
    qic: bool = False

    @property
    def name(self) -> str:
        v = "qic" if self.qic else "std"
        if self.family == "dense":
            return f"dense[{v}]"
        if self.family == "kvpress":
            return f"{self.method}@cr{self.ratio:.4f}[{v}]"
        if self.family == "quant":
            return f"{self.method}-{self.nbits}bit[{v}]"
        if self.family == "mustafar":
            return f"MUSTAFAR-KV{int(round(self.sparsity * 100))}[{v}]"
        if self.method == "tok+kivi":
            return f"MUSTAFAR-KV{int(round(self.sparsity * 100))}+KIVI{self.nbits}[{v}]"
        if self.method == "tok+fp8":
            return f"MUSTAFAR-KV{int(round(self.sparsity * 100))}+FP8[{v}]"
        return f"H2O@cr{self.ratio:.4f}+MUSTAFAR-KV{int(round(self.sparsity * 100))}[{v}]"

    @property
    def variant(self) -> str:
        return "qic" if self.qic else "std"

    def to_dict(self) -> dict:
        return asdict(self)


def keep_ratios(head_dim: int) -> tuple[float, float, float]:
    """Target fractions of dense bytes: MUSTAFAR's fp16 format ratio at 50 % and 70 %, and 0.2."""
    from mustafar.format import format_bytes_ratio

    return (format_bytes_ratio(head_dim, 0.5), format_bytes_ratio(head_dim, 0.7), 0.2)


def profile_specs(head_dim: int, families=("dense", "kvpress", "quant", "mustafar", "joint"),
                  presses=tuple(PRESSES), variants=("std", "qic")) -> list[PeerSpec]:
    """Every method of a run, for a model of ``head_dim``.

    Quantized and joint caches run in the standard variant only (the question never takes part in
    their compression); ``variants`` filters the rest.
    """
    keeps = keep_ratios(head_dim)
    crs = [round(1.0 - k, 6) for k in keeps]
    out: list[PeerSpec] = []
    for qic in (False, True):
        if ("qic" if qic else "std") not in variants:
            continue
        if "dense" in families:
            out.append(PeerSpec("dense", qic=qic))
        if "kvpress" in families:
            out += [PeerSpec("kvpress", p, ratio=cr, qic=qic) for p in presses for cr in crs]
        if "mustafar" in families:
            out += [PeerSpec("mustafar", "tok", sparsity=s, qic=qic) for s in (0.5, 0.7, 0.9)]
    if "std" in variants:
        if "quant" in families:
            out += [PeerSpec("quant", m, nbits=b) for m, b in QUANT]
        if "joint" in families:
            out += [PeerSpec("joint", "tok+kivi", sparsity=0.5, nbits=b) for b in (4, 2)]
            out += [PeerSpec("joint", "tok+fp8", sparsity=s, nbits=8) for s in (0.5, 0.7)]
            if "ObservedAttention" in presses:
                out += [PeerSpec("joint", "h2o+tok", ratio=cr, sparsity=0.5) for cr in crs[:2]]
    return out


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def unavailable(spec: PeerSpec) -> str | None:
    """Why this environment cannot run ``spec`` (``None``: it can). ``make peers`` runs every method
    in each of its two environments and merges: each runs what it can."""
    import transformers.cache_utils as cu

    if spec.family == "kvpress" or spec.method == "h2o+tok":
        return None if _has("kvpress") else "kvpress not installed (peers env: make peers)"
    if spec.method == "quanto":
        return None if _has("optimum.quanto") and hasattr(cu, "QuantoQuantizedLayer") else "optimum-quanto not installed"
    if spec.method == "hqq":
        return None if _has("hqq") and hasattr(cu, "HQQQuantizedLayer") else "hqq not installed"
    if spec.method == "qc-fp8":
        return None if hasattr(cu, "Fp8QuantizedLayer") else (
            "transformers' QuantizedCache has no fp8 backend before 5.2x (the peers env has 5.2)")
    if spec.family == "mustafar" or spec.method == "tok+fp8":
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__) < Version("5.17"):
            return f"MustafarCache needs transformers >= 5.17 (this env: {transformers.__version__}; main env: make venv)"
    return None
