"""MUSTAFAR against the KV-cache compressors a user would pick instead, at equal bytes (issue #17).

``python -m mustafar.eval.peers --model smollm2-135m --profile quick`` (``make peers``) writes
``results/peers_<model>.json`` + ``.csv``. It runs in its own environment (``.venv/peers``, built from
``envs/peers-requirements.txt``): NVIDIA kvpress 0.5.5 pins transformers < 5.3.

Methods (``PeerSpec``), all on the **same** RULER-style samples as the accuracy suite
(:func:`mustafar.eval.ruler.generate_samples`, same tasks, lengths, seed and sample indices, so
sample ``i`` of a cell here is sample ``i`` of the suite's cell), the same model and chat template:

- ``kvpress``: SnapKV, ExpectedAttention, KNorm, StreamingLLM, TOVA, ObservedAttention (H2O-style),
  at compression ratios ``1 - keep`` where ``keep`` is MUSTAFAR's fp16 byte ratio at 50 % / 70 %
  sparsity for the model's head_dim (:func:`mustafar.format.format_bytes_ratio`; D=64: 0.5625 /
  0.359) and 0.2. Two labelled variants: ``std`` = kvpress's standard pipeline (the context is
  compressed, the question is not seen during compression) and ``qic`` = question in the
  compressed prompt (only the chat-template suffix and the answer prefix come after compression).
- ``quant``: transformers' ``QuantizedCache`` (quanto 4/2-bit, HQQ 4/2-bit, group 64, residual
  128: the library defaults) and a plain FP8 (e4m3) KV cache with one fp16 scale per token vector
  (:class:`FP8Layer`). Their caches store fp16 (the model computes in fp32 on CPU; the cache casts
  on the way in and out), so their real tensor bytes are what an fp16 deployment holds.
- ``mustafar``: K and V per-token magnitude pruning in ``MustafarCache`` (``compressed`` mode,
  local window 32) through :func:`mustafar.eval.runtime.build_cache`, both variants.
- ``joint`` (the paper's joint experiments, ``simulate`` mode: the kernel does not read these
  combinations): per-token pruning + KIVI-style asymmetric group-wise 4/2-bit quantization of the
  kept values (one group = the kept values of one token vector, fp16 scale and minimum), and
  ObservedAttention (H2O-style) eviction followed by per-token pruning of the kept tokens.

How it runs (cost): per sample and variant, **one** prefill of the context with the model's
**eager** attention (ObservedAttention needs the attention matrix) and every press's
``compress(module, hidden_states, keys, values, attentions, kwargs)`` called from one forward hook
per attention layer with exactly the arguments kvpress's own hook passes (``attentions`` only to
ObservedAttention, ``None`` to the others as under sdpa). A press's hook runs after the layer's
attention, so the prefill is the same for every press and sharing it is exact
(``tests/test_peers.py`` checks it against ``with press(model): model.model(...)``). The answer
is then decoded as ``KVPressTextGenerationPipeline.generate_answer`` does (question tokens at
positions ``context_length...``, greedy), with the suite's early-stop rule
(:func:`mustafar.eval.ruler.stop_rule`; greedy, so stopping early only truncates) and the same
per-task ``max_new_tokens``. Tokenization is the pipeline's own ``preprocess`` (chat template,
context and question tokenized apart).

Bytes (every cell): ``bytes_ratio`` = asymptotic fp16 bytes per context token vs dense, measured on
the real tensors right after compression (kvpress: kept / all context tokens, read from the cache
tensors; quant/fp8: real bytes of the quantized storage incl. scales/zeros/packing, no residual;
MUSTAFAR: the bitmap format's ``8*W + 2*k`` per token vector, which is exactly the bytes of its
fp16 ``SparseKV`` tensors; joint: the same formula with packed codes + fp16 scale/min);
``bytes_ratio_end`` = every tensor the cache holds at the end of decoding (windows, residuals,
question and answer tokens) over a dense cache of the same tokens in the same dtype.

Uncertainty: per cell ``n`` (samples) and a Wilson 95 % interval with ``p = mean per-sample score``
and ``n`` samples (a sample's answers are not independent draws, so they do not count as trials).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["PeerSpec", "PRESSES", "PROFILES", "wilson", "keep_ratios", "profile_specs", "run_peers",
           "tensor_bytes", "FP8Layer", "joint_bytes_ratio", "split_prompt", "summarize"]

PRESSES = {"SnapKV": "SnapKVPress", "ExpectedAttention": "ExpectedAttentionPress", "KNorm": "KnormPress",
           "StreamingLLM": "StreamingLLMPress", "TOVA": "TOVAPress", "ObservedAttention": "ObservedAttentionPress"}
QUANT = (("quanto", 4), ("quanto", 2), ("hqq", 4), ("hqq", 2), ("fp8", 8))

PROFILES = {
    "tiny": dict(tasks=("niah_single",), lengths=(256,), samples=1),
    "quick": dict(tasks=("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "fwe"),
                  lengths=(1024,), samples=2),
    "full": dict(tasks=("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "fwe"),
                 lengths=(1024, 2048), samples=3),
}


# ------------------------------------------------------------------------------------ statistics
def wilson(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion ``p`` in [0, 1] from ``n`` trials (95 % by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = min(1.0, max(0.0, float(p)))
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


# ------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class PeerSpec:
    """One method of the peers runner.

    family : ``dense`` | ``kvpress`` | ``quant`` | ``mustafar`` | ``joint``.
    method : press name (``PRESSES``), ``quanto``/``hqq``/``fp8``, ``tok`` (MUSTAFAR per-token
        magnitude), ``tok+kivi`` or ``h2o+tok`` (joint).
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
        return f"H2O@cr{self.ratio:.4f}+MUSTAFAR-KV{int(round(self.sparsity * 100))}[{v}]"

    def to_dict(self) -> dict:
        return asdict(self)


def keep_ratios(head_dim: int) -> tuple[float, float, float]:
    """Target fractions of dense bytes: MUSTAFAR's fp16 format ratio at 50 % and 70 %, and 0.2."""
    from mustafar.format import format_bytes_ratio

    return (format_bytes_ratio(head_dim, 0.5), format_bytes_ratio(head_dim, 0.7), 0.2)


def profile_specs(head_dim: int, families=("dense", "kvpress", "quant", "mustafar", "joint"),
                  presses=tuple(PRESSES)) -> list[PeerSpec]:
    """Every method of a run, for a model of ``head_dim``."""
    keeps = keep_ratios(head_dim)
    crs = [round(1.0 - k, 6) for k in keeps]
    out: list[PeerSpec] = []
    for qic in (False, True):
        if "dense" in families:
            out.append(PeerSpec("dense", qic=qic))
        if "kvpress" in families:
            out += [PeerSpec("kvpress", p, ratio=cr, qic=qic) for p in presses for cr in crs]
        if "mustafar" in families:
            out += [PeerSpec("mustafar", "tok", sparsity=s, qic=qic) for s in (0.5, 0.7, 0.9)]
    if "quant" in families:
        out += [PeerSpec("quant", m, nbits=b) for m, b in QUANT]
    if "joint" in families:
        out += [PeerSpec("joint", "tok+kivi", sparsity=0.5, nbits=b) for b in (4, 2)]
        if "ObservedAttention" in presses:
            out += [PeerSpec("joint", "h2o+tok", ratio=cr, sparsity=0.5) for cr in crs[:2]]
    return out


# ------------------------------------------------------------------------------------ bytes
def tensor_bytes(obj) -> int:
    """Real bytes of every tensor in ``obj`` (tensors, tensor subclasses such as quanto's packed
    QTensors via ``__tensor_flatten__``, and lists / tuples / dicts of them)."""
    if isinstance(obj, torch.Tensor):
        flat = getattr(type(obj), "__tensor_flatten__", None)
        if flat is not None and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def joint_bytes_ratio(head_dim: int, sparsity: float, nbits: int) -> float:
    """fp16-relative bytes per token vector of pruning + group-wise quantized kept values:
    bitmap ``8*W`` + packed codes ``ceil(k*nbits/8)`` + fp16 scale and minimum (4 B) over ``2*D``."""
    from mustafar.format import kept_count

    W = head_dim // 64
    k = kept_count(head_dim, sparsity)
    return (8 * W + math.ceil(k * nbits / 8) + 4) / (2 * head_dim)


def _fp16_layer(cls):
    """A QuantizedLayer subclass whose storage is fp16 (K/V cast on the way in, back on the way out)."""
    class _Layer(cls):
        def update(self, key_states, value_states, cache_kwargs=None):
            k, v = super().update(key_states.half(), value_states.half(), cache_kwargs)
            return k.to(key_states.dtype), v.to(value_states.dtype)

        def storage(self):
            return {"q_keys": getattr(self, "_quantized_keys", None), "q_values": getattr(self, "_quantized_values", None),
                    "res_keys": self.keys, "res_values": self.values}
    _Layer.__name__ = "FP16" + cls.__name__
    return _Layer


def _fp8_layer_class():
    from transformers.cache_utils import DynamicLayer

    class FP8Layer(DynamicLayer):
        """K/V stored as float8_e4m3fn with one fp16 scale (amax / 448) per token vector; the token
        being added is returned in full precision (as QuantizedCache does), the past dequantized."""

        def __init__(self):
            super().__init__()
            self.cumulative_length = 0

        @staticmethod
        def _q(x):
            scale = (x.float().abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-8).half()
            return (x.float() / scale.float()).to(torch.float8_e4m3fn), scale

        @staticmethod
        def _dq(q, s, dtype):
            return (q.float() * s.float()).to(dtype)

        def update(self, key_states, value_states, cache_kwargs=None):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.kq, self.ks = self._q(key_states)
                self.vq, self.vs = self._q(value_states)
                self.cumulative_length = key_states.shape[-2]
                return key_states, value_states
            K = torch.cat([self._dq(self.kq, self.ks, key_states.dtype), key_states], -2)
            V = torch.cat([self._dq(self.vq, self.vs, value_states.dtype), value_states], -2)
            kq, ks = self._q(key_states)
            vq, vs = self._q(value_states)
            self.kq, self.ks = torch.cat([self.kq, kq], -2), torch.cat([self.ks, ks], -2)
            self.vq, self.vs = torch.cat([self.vq, vq], -2), torch.cat([self.vs, vs], -2)
            self.cumulative_length += key_states.shape[-2]
            return K, V

        def get_seq_length(self):
            return self.cumulative_length

        def storage(self):
            return {"kq": self.kq, "ks": self.ks, "vq": self.vq, "vs": self.vs}

    return FP8Layer


def FP8Layer():  # noqa: N802 - a factory, the class needs transformers at import time
    """A fresh :class:`FP8Layer` (see :func:`_fp8_layer_class`)."""
    return _fp8_layer_class()()


# ------------------------------------------------------------------------------------ prompts
def split_prompt(user: str) -> tuple[str, str]:
    """Split a RULER user turn into (context, question) at its last newline (every task's question
    line follows the context after a newline)."""
    i = user.rfind("\n")
    if i <= 0:
        raise ValueError("no newline between context and question in the user turn")
    return user[:i], user[i:]


def preprocess(tokenizer, context: str, question: str, answer_prefix: str):
    """``KVPressTextGenerationPipeline.preprocess`` for one question (kvpress 0.5.5; the test checks
    they agree): chat template around ``context + question``, split so that the question, the
    template's suffix and the answer prefix come after the compressed context. Own copy so that the
    MUSTAFAR cells, which run in the main environment (``MustafarCache`` needs transformers >= 5.17),
    see the same token ids. Returns (context_ids [1, T], question_ids [1, Q])."""
    if tokenizer.chat_template is None:
        context = (getattr(tokenizer, "bos_token", "") or "") + context
        suffix = "\n"
    else:
        sep = "#" * (len(context) + 10)
        context = tokenizer.apply_chat_template([{"role": "user", "content": context + sep}],
                                                add_generation_prompt=True, tokenize=False, enable_thinking=False)
        context, suffix = context.split(sep)
    q = question + suffix + answer_prefix
    enc = lambda t: torch.tensor([tokenizer.encode(t, add_special_tokens=False)])  # noqa: E731
    return enc(context), enc(q)


def _make_press(name: str, cr: float):
    import kvpress

    return getattr(kvpress, PRESSES[name])(compression_ratio=cr)


@contextlib.contextmanager
def multi_press(model, presses: dict, store: dict):
    """Register one forward hook per attention layer that calls every press's ``compress`` on the
    prefill's keys / values exactly as kvpress's ``BasePress.forward_hook`` would, storing the
    results in ``store[key][layer_idx] = (keys, values)``; the cache itself stays dense."""
    from kvpress import ObservedAttentionPress
    from kvpress.presses.base_press import is_prefilling
    from kvpress.utils import extract_keys_and_values

    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    for p in presses.values():
        p.post_init_from_model(model)
    for key in presses:
        store.setdefault(key, {})

    def hook(module, args, kwargs, output):
        hs = kwargs["hidden_states"]
        if not is_prefilling(kwargs["cache_position"], hs.shape[1]):
            return output
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        for key, p in presses.items():
            att = output[1] if isinstance(p, ObservedAttentionPress) else None
            store[key][module.layer_idx] = p.compress(module, hs, keys, values, att, kwargs)
        return output

    hooks = []
    try:
        for layer in lm.layers:
            layer.self_attn.rotary_emb = lm.rotary_emb
            hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        yield store
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _attn(model, impl: str):
    old = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@torch.inference_mode()
def shared_prefill(model, context_ids, presses: dict):
    """Dense (eager) prefill of ``context_ids`` through ``model.model`` with every press's compress.

    Returns (dense_keys, dense_values, {key: [(k, v) per layer]})."""
    from transformers import DynamicCache

    store: dict = {}
    cache = DynamicCache(config=model.config)
    hooks = multi_press(model, presses, store) if presses else contextlib.nullcontext()
    with _attn(model, "eager" if presses else model.config._attn_implementation), hooks:
        model.model(input_ids=context_ids, past_key_values=cache)
    n = len(cache.layers)
    comp = {k: [store[k][i] for i in range(n)] for k in presses}
    return [l.keys for l in cache.layers], [l.values for l in cache.layers], comp


@torch.inference_mode()
def answer(model, tokenizer, cache, question_ids, context_length: int, max_new_tokens: int, stop=None):
    """``KVPressTextGenerationPipeline.generate_answer`` (same positions, greedy, EOS rule) plus an
    optional ``stop(text)`` early stop. Returns (decoded text, tokens written to the cache)."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    pos = torch.arange(context_length, context_length + question_ids.shape[1]).unsqueeze(0)
    out = model(input_ids=question_ids, past_key_values=cache, position_ids=pos, logits_to_keep=1)
    pos = pos[:, -1:] + 1
    ids = [int(out.logits[0, -1].argmax())]
    for i in range(max_new_tokens - 1):
        if stop is not None and stop(tokenizer.decode(ids, skip_special_tokens=True)):
            break
        out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, position_ids=pos + i)
        ids.append(int(out.logits[0, -1].argmax()))
        if ids[-1] in eos:
            break
    # tokens written to the cache: the question and every generated token but the last
    return tokenizer.decode(ids, skip_special_tokens=True), question_ids.shape[1] + len(ids) - 1


# ------------------------------------------------------------------------------------ caches
def _dense_cache(model, keys, values):
    from transformers import DynamicCache

    c = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(zip(keys, values)):
        c.update(k.clone(), v.clone(), i)
    return c


def _fp16_dense_bytes(keys) -> int:
    return sum(2 * k.numel() * 2 for k in keys)  # K and V, 2 bytes each


def _prune_tok(x, sparsity, window: int = 32):
    from mustafar.pruning import prune

    T = x.shape[-2]
    n = max(0, T - window)
    if n == 0:
        return x.clone()
    return torch.cat([prune(x[..., :n, :], sparsity, "per_token_magnitude"), x[..., n:, :]], -2)


def _kivi_kept(x, sparsity, nbits, window: int = 32):
    """Per-token magnitude pruning, then asymmetric ``nbits`` quantization of each token vector's kept
    values (scale and minimum in fp16 over the kept values only); pruned entries stay 0."""
    from mustafar.pruning import prune

    T = x.shape[-2]
    n = max(0, T - window)
    if n == 0:
        return x.clone()
    head = x[..., :n, :]
    pruned, mask = prune(head, sparsity, "per_token_magnitude", return_mask=True)
    big = torch.finfo(head.dtype).max
    mn = torch.where(mask, head, torch.full_like(head, big)).amin(-1, keepdim=True).half().float()
    mx = torch.where(mask, head, torch.full_like(head, -big)).amax(-1, keepdim=True)
    levels = 2 ** nbits - 1
    scale = ((mx - mn) / levels).clamp_min(1e-8).half().float()
    q = ((head - mn) / scale).round().clamp(0, levels)
    deq = torch.where(mask, q * scale + mn, torch.zeros_like(head))
    return torch.cat([deq.to(x.dtype), x[..., n:, :]], -2)


def build_peer_cache(model, spec: PeerSpec, keys, values, comp: dict, max_len: int):
    """The cache of ``spec`` after the context prefill, and its asymptotic fp16 ``bytes_ratio``."""
    from transformers import DynamicCache
    from transformers.cache_utils import Cache

    D = keys[0].shape[-1]
    if spec.family == "dense":
        return _dense_cache(model, keys, values), 1.0
    if spec.family == "kvpress":
        kv = comp[(spec.method, spec.ratio)]
        c = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(kv):
            c.update(k.clone(), v.clone(), i)
        kept = sum(k.numel() + v.numel() for k, v in kv)
        return c, kept / sum(k.numel() + v.numel() for k, v in zip(keys, values))
    if spec.family == "quant":
        n = len(keys)
        if spec.method == "fp8":
            layers = [FP8Layer() for _ in range(n)]
        else:
            from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

            base = QuantoQuantizedLayer if spec.method == "quanto" else HQQQuantizedLayer
            layers = [_fp16_layer(base)(spec.nbits, 0, 0, 64, 128) for _ in range(n)]
        c = Cache(layers=layers)
        for i, (k, v) in enumerate(zip(keys, values)):
            c.update(k, v, i)
        return c, tensor_bytes([l.storage() for l in c.layers]) / _fp16_dense_bytes(keys)
    if spec.family == "mustafar":
        from mustafar.format import format_bytes_ratio

        from .runtime import CacheSpec, PrefillState, build_cache

        cs = CacheSpec(k_sparsity=spec.sparsity, v_sparsity=spec.sparsity)
        st = PrefillState(list(keys), list(values), None, torch.zeros(1), int(keys[0].shape[-2]))
        cache, _ = build_cache(model, st, cs, max_new_tokens=max_len)
        return cache, format_bytes_ratio(D, spec.sparsity)
    if spec.family == "joint" and spec.method == "tok+kivi":
        ks = [_kivi_kept(k, spec.sparsity, spec.nbits) for k in keys]
        vs = [_kivi_kept(v, spec.sparsity, spec.nbits) for v in values]
        return _dense_cache(model, ks, vs), joint_bytes_ratio(D, spec.sparsity, spec.nbits)
    if spec.family == "joint" and spec.method == "h2o+tok":
        from mustafar.format import format_bytes_ratio

        kv = comp[("ObservedAttention", spec.ratio)]
        ks = [_prune_tok(k, spec.sparsity) for k, _ in kv]
        vs = [_prune_tok(v, spec.sparsity) for _, v in kv]
        kept = sum(k.numel() for k, _ in kv) / sum(k.numel() for k in keys)
        return _dense_cache(model, ks, vs), kept * format_bytes_ratio(D, spec.sparsity)
    raise ValueError(f"unknown spec {spec}")


# ------------------------------------------------------------------------------------ runner
def cell_key(c: dict) -> str:
    f = ("model", "task", "context_length", "n_samples", "seed", "family", "method", "ratio", "sparsity", "nbits", "qic")
    return json.dumps({k: c.get(k) for k in f}, sort_keys=True)


def _save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
    try:
        import pandas as pd

        df = summarize(results)
        tmpc = path.with_suffix(".csv.tmp")
        df.to_csv(tmpc, index=False)
        os.replace(tmpc, path.with_suffix(".csv"))
    except ImportError:  # pragma: no cover
        pass


def load(path) -> dict:
    p = Path(path)
    if p.is_file():
        with open(p) as f:
            return json.load(f)
    return {"provenance": {}, "profiles": {}, "notes": {}, "cells": []}


def run_peers(model_name: str = "smollm2-135m", profile: str = "quick", out_dir="results", out_name=None,
              specs=None, tasks=None, lengths=None, samples=None, seed: int = 0, model_obj=None, tokenizer=None,
              resume: bool = True, progress: bool = True, command: str | None = None) -> dict:
    """Run (or resume) the peers on the profile's RULER cells; writes ``<out_dir>/peers_<model>.json`` + csv."""
    from tqdm.auto import tqdm

    from mustafar.provenance import collect

    from . import ruler
    from .metrics import ruler_sample_score

    prof = dict(PROFILES[profile])
    tasks = tuple(tasks or prof["tasks"])
    lengths = tuple(lengths or prof["lengths"])
    n = int(samples or prof["samples"])
    if model_obj is None:
        from mustafar.models import load_model
        model_obj, tokenizer = load_model(model_name)
    model = model_obj
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    specs = list(specs) if specs is not None else profile_specs(D)
    path = Path(out_dir) / (out_name or f"peers_{model_name.replace('/', '_')}.json")
    results = load(path) if resume else load("/nonexistent")
    results["provenance"] = collect(command)
    results.setdefault("profiles", {})[profile] = dict(tasks=list(tasks), lengths=list(lengths), samples=n, seed=seed)
    results["notes"] = dict(
        keep_ratios=list(keep_ratios(D)), head_dim=D,
        doc=(__doc__ or "").split("\n\n")[0],
        prefill="one eager prefill per sample and variant; every press compress()es in one shared hook "
                "(exact: a press's hook runs after the layer's attention)",
        decode="generate_answer of kvpress's pipeline + the suite's early stop (ruler.stop_rule)",
        ci="Wilson 95% with p = mean per-sample score, n = samples",
        bytes_ratio="asymptotic fp16 bytes per context token vs dense, measured on the real tensors after compression",
        bytes_ratio_end="real bytes held at the end of decoding / dense bytes of the same tokens, same dtype",
        joint="simulate mode (dense tensors with the pruned / quantized values): MustafarCache cannot store them")
    done = {cell_key(c) for c in results["cells"]}
    t_start = time.perf_counter()
    for L in lengths:
        for task in tasks:
            base = dict(model=model_name, task=task, context_length=int(L), n_samples=n, seed=seed)
            pend = [s for s in specs if cell_key(dict(base, **s.to_dict())) not in done]
            if not pend:
                continue
            smps = ruler.generate_samples(task, tokenizer, int(L), n, seed=seed)
            acc = {s.name: dict(scores=[], preds=[], br=[], real=0, dense=0, sec=0.0) for s in pend}
            prefill_s = 0.0
            press_keys = sorted({(s.method, s.ratio) for s in pend if s.family == "kvpress"}
                                | {("ObservedAttention", s.ratio) for s in pend if s.method == "h2o+tok"})
            bar = tqdm(total=len(smps) * len(pend), desc=f"peers {task}@{L}", disable=not progress, leave=False)
            for smp in smps:
                ctx, q = split_prompt(smp.user)
                stop = ruler.stop_rule(task, len(smp.answers))
                for qic in (False, True):
                    group = [s for s in pend if s.qic == qic]
                    if not group:
                        continue
                    cids, qids = preprocess(tokenizer, ctx + q if qic else ctx, "" if qic else q,
                                            smp.answer_prefix.lstrip())
                    keys_needed = [k for k in press_keys if any(
                        s.family == "kvpress" and (s.method, s.ratio) == k or
                        s.method == "h2o+tok" and ("ObservedAttention", s.ratio) == k for s in group)]
                    presses = {k: _make_press(k[0], k[1]) for k in keys_needed}
                    t0 = time.perf_counter()
                    keys, values, comp = shared_prefill(model, cids, presses)
                    prefill_s += time.perf_counter() - t0
                    for s in group:
                        t0 = time.perf_counter()
                        cache, br = build_peer_cache(model, s, keys, values, comp, qids.shape[1] + smp.max_new_tokens + 1)
                        pred, n_fed = answer(model, tokenizer, cache, qids, cids.shape[1], smp.max_new_tokens, stop)
                        real, dense = _end_bytes(cache, keys, n_fed)
                        a = acc[s.name]
                        a["sec"] += time.perf_counter() - t0
                        a["scores"].append(ruler_sample_score(pred, smp.answers, smp.metric))
                        a["preds"].append(pred)
                        a["br"].append(br)
                        a["real"] += real
                        a["dense"] += dense
                        a.setdefault("prompt_sha256", []).append(hashlib.sha256(
                            (tokenizer.decode(cids[0]) + "|" + tokenizer.decode(qids[0])).encode()).hexdigest()[:16])
                        a.setdefault("context_tokens", []).append(int(cids.shape[1]))
                        del cache
                        bar.update(1)
                    del keys, values, comp
            bar.close()
            for s in pend:
                a = acc[s.name]
                p = sum(a["scores"]) / len(a["scores"])
                lo, hi = wilson(p, len(a["scores"]))
                c = dict(base, **s.to_dict(), name=s.name, profile=profile, variant="qic" if s.qic else "std",
                         score=round(100 * p, 2), ci95_lo=round(100 * lo, 2), ci95_hi=round(100 * hi, 2),
                         n=len(a["scores"]), sample_scores=a["scores"], preds=a["preds"],
                         answers=[x.answers for x in smps], chance=round(ruler.chance_score(smps), 3),
                         bytes_ratio=round(sum(a["br"]) / len(a["br"]), 6),
                         # joint cells are simulated (dense tensors): no real end-of-decode bytes
                         bytes_ratio_end=(round(a["real"] / a["dense"], 6) if a["dense"] and s.family != "joint"
                                          else None),
                         context_tokens=a["context_tokens"], prompt_sha256=a["prompt_sha256"],
                         seconds_decode=round(a["sec"], 2), seconds_prefill_shared=round(prefill_s, 2))
                results["cells"].append(c)
                done.add(cell_key(c))
            _save(results, path)
            if progress:
                print(f"[peers] {task}@{L}: {len(pend)} cells ({time.perf_counter() - t_start:.0f}s)", flush=True)
    results["last_run"] = dict(profile=profile, seconds=round(time.perf_counter() - t_start, 1))
    _save(results, path)
    return results


def _end_bytes(cache, keys, n_fed: int) -> tuple[int, int]:
    """(real bytes held at the end of decoding, dense bytes of the same tokens in the same dtype:
    the whole context plus the ``n_fed`` question / answer tokens)."""
    if hasattr(cache, "nbytes") and hasattr(cache, "dense_nbytes"):  # MustafarCache
        return int(cache.nbytes()), int(cache.dense_nbytes())
    real = dense = 0
    for l, k0 in zip(cache.layers, keys):
        per_tok = 2 * k0.shape[0] * k0.shape[1] * k0.shape[-1]  # K and V: B * H_kv * D each
        T = k0.shape[-2] + n_fed
        if hasattr(l, "storage"):  # quantized / fp8: stores fp16
            real += tensor_bytes(l.storage())
            dense += T * per_tok * 2
        else:
            real += tensor_bytes([l.keys, l.values])
            dense += T * per_tok * l.keys.element_size()
    return real, dense


# ------------------------------------------------------------------------------------ tables
def summarize(results, variant: str | None = None):
    """One row per method: average score over (task, length) cells, pooled n, Wilson CI over all
    samples, bytes ratios; sorted by family and bytes."""
    import pandas as pd

    cells = results["cells"] if isinstance(results, dict) else results
    rows = []
    by: dict = {}
    for c in cells:
        by.setdefault(c["name"], []).append(c)
    for name, cs in by.items():
        scores = [x for c in cs for x in c["sample_scores"]]
        p = sum(scores) / len(scores)
        lo, hi = wilson(p, len(scores))
        c0 = cs[0]
        rows.append(dict(name=name, family=c0["family"], method=c0["method"], variant=c0["variant"],
                         ratio=c0["ratio"], sparsity=c0["sparsity"], nbits=c0["nbits"],
                         bytes_ratio=round(sum(c["bytes_ratio"] for c in cs) / len(cs), 4),
                         bytes_ratio_end=(round(sum(c["bytes_ratio_end"] for c in cs) / len(cs), 4)
                                          if all(c.get("bytes_ratio_end") is not None for c in cs) else None),
                         avg=round(sum(c["score"] for c in cs) / len(cs), 2), n=len(scores),
                         ci95_lo=round(100 * lo, 1), ci95_hi=round(100 * hi, 1), cells=len(cs),
                         **{f"{c['task']}@{c['context_length']}": c["score"] for c in cs}))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    if variant is not None:
        df = df[df.variant == variant]
    return df.sort_values(["variant", "family", "bytes_ratio", "name"], ascending=[True, True, False, True]).reset_index(drop=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mustafar.eval.peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default="quick", choices=list(PROFILES))
    ap.add_argument("--out", default="results")
    ap.add_argument("--out-name", default=None)
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--families", default="dense,kvpress,quant,mustafar,joint")
    ap.add_argument("--variants", default="std,qic", help="std (kvpress's pipeline) and/or qic (question in context)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--merge", nargs="*", default=None, help="merge these result files into --out/--out-name and exit")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cmd = " ".join(["python -m mustafar.eval.peers"] + (sys.argv[1:] if argv is None else list(argv)))
    path = Path(a.out) / (a.out_name or f"peers_{a.model.replace('/', '_')}.json")
    if a.merge is not None:
        merged = load("/nonexistent")
        seen = set()
        for p in a.merge:
            r = load(p)
            merged["profiles"].update(r.get("profiles", {}))
            merged["notes"] = r.get("notes", merged["notes"])
            merged.setdefault("merged_from", []).append({"path": str(p), "provenance": r.get("provenance"),
                                                          "last_run": r.get("last_run")})
            for c in r["cells"]:
                if cell_key(c) not in seen:
                    seen.add(cell_key(c))
                    merged["cells"].append(c)
        from mustafar.provenance import collect
        merged["provenance"] = collect(cmd)
        _save(merged, path)
        res = merged
    else:
        model, tok = None, None
        from mustafar.models import load_model
        model, tok = load_model(a.model)
        D = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        specs = profile_specs(D, families=tuple(a.families.split(",")))
        keep = set(a.variants.split(","))
        specs = [s for s in specs if ("qic" if s.qic else "std") in keep]
        res = run_peers(a.model, a.profile, a.out, a.out_name, specs=specs,
                        tasks=a.tasks.split(",") if a.tasks else None,
                        lengths=[int(x) for x in a.lengths.split(",")] if a.lengths else None,
                        samples=a.samples, model_obj=model, tokenizer=tok, resume=not a.no_resume, command=cmd)
    import pandas as pd
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_rows", 200):
        print(summarize(res).drop(columns=["method", "ratio", "sparsity", "nbits"]).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
