"""MUSTAFAR against the KV-cache compressors a user would pick instead, at equal bytes (issue #17).

``python -m mustafar.eval.peers --model smollm2-135m --profile quick`` writes
``results/peers_<model>.json`` + ``.csv``; ``make peers`` (``PEERS_PROFILE=full`` for the full
profile) runs every method in two environments and merges: ``.venv/peers`` (built from
``envs/peers-requirements.txt``: NVIDIA kvpress 0.5.5 pins transformers < 5.3, so quanto / HQQ run
there too) and the main ``.venv`` (transformers 5.24: ``MustafarCache`` and transformers'
``QuantizedCache(backend="fp8")``, which 5.2 does not have). Each skips what it cannot run.

Methods (:class:`PeerSpec`, :mod:`.specs`), all on the **same** RULER-style samples as the accuracy
suite (:func:`mustafar.eval.ruler.generate_samples`: same tasks, lengths, seed and sample indices, so
sample ``i`` of a cell here is sample ``i`` of the suite's cell), the same model and chat template:

- ``kvpress``: SnapKV, ExpectedAttention, KNorm, StreamingLLM, TOVA, ObservedAttention (H2O-style),
  at compression ratios ``1 - keep`` where ``keep`` is MUSTAFAR's fp16 byte ratio at 50 % / 70 %
  sparsity for the model's head_dim and 0.2. Two labelled variants: ``std`` = kvpress's standard
  pipeline (the context is compressed, the question is not seen during compression) and ``qic`` =
  question in the compressed prompt (only the chat-template suffix and the answer prefix come after).
- ``quant``: transformers' ``QuantizedCache`` layers (quanto 4/2-bit, HQQ 4/2-bit, group 64, residual
  128: the library defaults, fp16 storage), its ``fp8`` backend (``qc-fp8``: per-tensor scale frozen
  after the first update), and a plain FP8 (e4m3) KV cache with one fp16 scale per token vector (``fp8``).
- ``mustafar``: K and V per-token magnitude pruning in ``MustafarCache`` (``compressed`` mode, local
  window 32) through :func:`mustafar.eval.runtime.build_cache`, both variants.
- ``joint`` (the paper's joint experiments): per-token pruning + KIVI-style asymmetric group-wise 4/2-bit
  quantization of the kept values (one group = the kept values of one token vector, fp16 scale and
  minimum; ``simulate``-style dense caches: the kernel does not read this combination), ObservedAttention
  (H2O-style) eviction followed by per-token pruning of the kept tokens (same), and ``tok+fp8``: per-token
  pruning at 50 / 70 % with e4m3 kept values and a float16 scale per token vector, the kernel issue's
  format, run in the real compressed ``MustafarCache`` (``k_value_dtype = v_value_dtype = "fp8_e4m3"``;
  the op decodes it directly).

Hybrid models (Gemma 3 270M: 15 of 18 layers sliding-window): every method compresses the 3 global
layers only, the sliding layers keep their dense 512-token window (:mod:`.caches`).

Modules: :mod:`.specs` (methods, profiles, availability), :mod:`.presses` (kvpress on one shared
prefill), :mod:`.prompts` (pipeline split, ``generate_answer``), :mod:`.caches` (one cache per
method), :mod:`.accounting` (bytes), :mod:`.stats` (Wilson intervals, summary), :mod:`.run` (runner,
resumable atomic results file, merge), ``__main__`` (CLI).
"""
from __future__ import annotations

from .accounting import cache_bytes_ratio, end_bytes, joint_bytes_ratio, tensor_bytes
from .caches import FP8Layer, build_peer_cache, compressed_layers, kivi_kept, prune_tok, replay
from .presses import make_press, shared_prefill
from .prompts import answer, build_samples, cell_samples, preprocess, split_prompt
from .run import cell_key, load, merge, run_peers, save
from .specs import PRESSES, PROFILES, QUANT, PeerSpec, keep_ratios, profile_specs, unavailable
from .stats import summarize, wilson

__all__ = ["PeerSpec", "PRESSES", "PROFILES", "QUANT", "wilson", "keep_ratios", "profile_specs", "unavailable",
           "run_peers", "tensor_bytes", "FP8Layer", "joint_bytes_ratio", "cache_bytes_ratio", "end_bytes",
           "split_prompt", "preprocess", "answer", "build_samples", "cell_samples", "summarize", "build_peer_cache", "compressed_layers",
           "kivi_kept", "prune_tok", "replay", "make_press", "shared_prefill", "cell_key", "load", "merge", "save"]
