"""What every benchmark shares: timing, the results file, the caches compared, the random fill.

* **Timing**: :func:`time_all_ms` / :func:`time_ms` (warm-up, then the median of many repetitions;
  CUDA events on a GPU, ``time.perf_counter`` on the CPU), :func:`gpu_bench_ms` (the kernel
  benchmarks' timer: ``triton.testing.do_bench`` with an L2 flush before every repetition),
  :func:`timed_call` (one synchronised call) and :func:`affine_fit` (least-squares line).
* **Results file**: :func:`provenance` and :func:`write_results`, the one way a benchmark writes
  ``results/<name>.json`` with ``{"provenance": mustafar.provenance.collect(), ...}``;
  :func:`default_out` is the default path under :func:`mustafar.provenance.results_dir`.
* **Caches by name**: :func:`make_cache` builds ``dense`` (transformers ``DynamicCache``), ``static``
  (``StaticCache``), ``compressed`` and ``simulate`` (:class:`mustafar.MustafarCache`).
* **Random fill**: :func:`fill_cache` writes random K/V into any of them without running the model;
  :data:`FILLS` names the two ways a decode benchmark fills its cache (real prefill or random K/V).
* **Environment / device**: :func:`sdpa_backends`, :func:`sync`, :func:`mem_reset`, :func:`mem_peak`,
  :func:`free`, :func:`is_oom`, :func:`loadavg`, :func:`set_threads`, :func:`require_cuda`.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

__all__ = [
    "CACHE_KINDS", "DENSE_KINDS", "FILLS", "GIB", "MUSTAFAR_KINDS", "affine_fit", "cache_nbytes",
    "command_line", "default_out", "fill_cache", "free", "gpu_bench_ms", "is_oom", "kv_shape", "loadavg", "make_cache",
    "mem_peak", "mem_reset", "mustafar_config", "prefill", "provenance", "random_fill", "require_cuda", "sdpa_backends",
    "set_threads", "sync", "text_config", "time_all_ms", "time_ms", "timed_call", "upper_median",
    "use_dense_attention", "write_results",
]

GIB = 1 << 30
_now = time.perf_counter  # the CPU clock of every timer here (a module attribute so tests can replace it)


# ------------------------------------------------------------------------------------------------ timing
def sync(device=None) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU.

    Parameters
    ----------
    device : torch.device, str or None
        ``None`` or a CUDA device synchronises CUDA when it is available; a CPU device does nothing.
    """
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(dev)


def time_all_ms(fn, reps: int = 30, warmup: int = 3, device=None, flush_l2: bool = False) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn()`` after ``warmup`` untimed calls.

    Parameters
    ----------
    fn : callable
        Called ``warmup + reps`` times without arguments.
    reps, warmup : int
        Timed repetitions (>= 1) and warm-up calls (>= 0).
    device : torch.device, str or None
        ``"cuda"`` (or a CUDA device): each call is bracketed by CUDA events (GPU time of the work
        queued by ``fn``); anything else: ``time.perf_counter`` around each call.
    flush_l2 : bool
        CUDA only: zero a 256 MiB buffer before each timed call, so that every call reads its inputs
        from HBM rather than from the L2 cache.

    Returns
    -------
    list of float, length ``reps``
    """
    if int(reps) < 1 or int(warmup) < 0:
        raise ValueError(f"reps={reps} must be >= 1 and warmup={warmup} >= 0")
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(int(warmup)):
        fn()
    times = []
    if cuda:
        flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if flush_l2 else None
        torch.cuda.synchronize()
        for _ in range(int(reps)):
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(float(start.elapsed_time(end)))
        return times
    for _ in range(int(reps)):
        t0 = _now()
        fn()
        times.append((_now() - t0) * 1e3)
    return times


def time_ms(fn, reps: int = 30, warmup: int = 3, device=None, flush_l2: bool = False) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` repetitions after ``warmup`` calls
    (:func:`time_all_ms`; ``statistics.median``, the mean of the middle two for an even ``reps``)."""
    return float(statistics.median(time_all_ms(fn, reps, warmup, device, flush_l2)))


def gpu_bench_ms(fn, warmup_ms: float = 25.0, rep_ms: float = 150.0) -> float:
    """Median milliseconds of a CUDA ``fn()``: ``triton.testing.do_bench`` (warm-up and repetitions
    sized by time, the L2 cache flushed before every repetition). Without triton: :func:`time_ms`
    with CUDA events, 5 warm-up calls, 50 repetitions and the same L2 flush."""
    try:
        from triton.testing import do_bench
    except ImportError:  # pragma: no cover - triton ships with CUDA torch
        return time_ms(fn, reps=50, warmup=5, device="cuda", flush_l2=True)
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def timed_call(fn, device=None):
    """``(fn(), seconds)``: one call timed on the wall clock, the device synchronised before and after."""
    sync(device)
    t0 = _now()
    out = fn()
    sync(device)
    return out, _now() - t0


def upper_median(xs):
    """``sorted(xs)[len(xs) // 2]`` (the upper median: a measured value, never an average of two);
    ``None`` for no values."""
    return sorted(xs)[len(xs) // 2] if xs else None


def affine_fit(xs, ys) -> tuple[float, float]:
    """Least-squares line ``y = a + b x`` through the points; ``(a, b)``, with ``b = 0`` when all
    ``xs`` are equal."""
    n = len(xs)
    if n == 0 or n != len(ys):
        raise ValueError(f"need as many ys as xs (>= 1), got {len(xs)} and {len(ys)}")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return my - b * mx, b


# ------------------------------------------------------------------------------------------------ results file
def command_line(subcommand: str, argv) -> str:
    """``"python -m mustafar.bench <subcommand> <argv...>"``: the command recorded in the provenance."""
    return " ".join(["python -m mustafar.bench", subcommand, *map(str, argv)])


def provenance(command: str | None = None, **extra) -> dict:
    """:func:`mustafar.provenance.collect` plus what a benchmark's numbers also depend on.

    Parameters
    ----------
    command : str, optional
        The command that made the results (:func:`command_line`); default ``collect``'s own.
    **extra
        More keys to record (e.g. ``backend``).

    Returns
    -------
    dict
        ``collect(command)`` with ``sm_count`` (multiprocessors of CUDA device 0; ``None`` without a
        GPU), ``threads`` (``torch.get_num_threads()``) and ``extra``.
    """
    from mustafar.provenance import collect

    prov = collect(command=command)
    prov["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else None
    prov["threads"] = torch.get_num_threads()
    prov.update(extra)
    return prov


def default_out(name: str) -> Path:
    """``mustafar.provenance.results_dir() / name``: where a benchmark writes by default."""
    from mustafar.provenance import results_dir

    return results_dir() / name


def gpu_slug(device=None) -> str:
    """A short file-name tag of the current CUDA device: ``"h100"`` / ``"h200"`` / ... (the first ``[A-Z]\\d+``
    model token of its name, lower case), or the sanitised name; ``"cpu"`` without CUDA. GPU results are named
    ``<benchmark>_<slug>.json`` so that runs on different cards sit side by side."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return slug_of_device_name(name)


def slug_of_device_name(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``, ``"NVIDIA A100-SXM4-80GB"`` -> ``"a100"``; a name without such a
    token is sanitised (``"NVIDIA GeForce RTX 4090"`` -> ``"nvidia_geforce_rtx_4090"``)."""
    import re

    m = re.search(r"\b[A-Z]{1,2}\d{2,4}\b", name)
    if m:
        return m.group(0).lower()
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def write_results(path, res: dict, command: str | None = None, prov: dict | None = None, **extra) -> Path:
    """Write ``res`` as JSON to ``path`` with its ``"provenance"`` block: the one writer of results files.

    Parameters
    ----------
    path : str or Path
        The file; its folder is created. Written to ``<path>.tmp`` first and renamed, so an
        interrupted run never leaves a truncated file (a grid rewrites its file after every sweep).
    res : dict
        The results; ``res["provenance"]`` is set (in place).
    command : str, optional
        Passed to :func:`provenance` when ``prov`` is not given.
    prov : dict, optional
        A provenance block already collected (e.g. once at the start of a long run).
    **extra
        Passed to :func:`provenance` when ``prov`` is not given.

    Returns
    -------
    Path
        ``path``.
    """
    res["provenance"] = prov if prov is not None else provenance(command, **extra)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ caches by name
DENSE_KINDS = ("dense", "static")
MUSTAFAR_KINDS = ("compressed", "compressed-fp8", "simulate")
CACHE_KINDS = DENSE_KINDS + MUSTAFAR_KINDS


def make_cache(kind: str, model, sparsity: float = 0.0, max_len: int | None = None, kernel: str = "auto"):
    """A cache of the named kind for ``model``.

    Parameters
    ----------
    kind : str
        ``"dense"``: transformers ``DynamicCache`` (grows by ``torch.cat``); ``"static"``:
        ``StaticCache`` of ``max_len`` tokens (preallocated); ``"compressed"`` / ``"simulate"``:
        :class:`mustafar.MustafarCache` with ``MustafarConfig(k_sparsity=v_sparsity=sparsity,
        mode=kind)`` and ``max_cache_len=max_len``; ``"compressed-fp8"``: compressed with e4m3 stored
        values on both sides.
    model : transformers model
    sparsity : float
        K and V sparsity of a MustafarCache (ignored by the dense kinds).
    max_len : int, optional
        Tokens to preallocate (required for ``"static"``).
    kernel : str
        ``MustafarConfig.decode_kernel`` of a MustafarCache: ``"auto"`` or a CUDA kernel name.

    Returns
    -------
    the cache

    Notes
    -----
    A MustafarCache switches the model to the ``"mustafar"`` attention, whose mask function returns
    no mask for a plain decode step; a dense cache built afterwards would run under it (a
    StaticCache: sdpa over the whole preallocated buffer without the padding mask). The dense
    kinds therefore switch the model back first (:func:`use_dense_attention`: ``"sdpa"``, and for ``"static"``
    sdpa with the query heads of a GQA model packed per KV head).
    """
    if kind not in CACHE_KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; known: {CACHE_KINDS}")
    if kind in DENSE_KINDS:
        use_dense_attention(model, kind)
        if kind == "dense":
            from transformers import DynamicCache

            return DynamicCache(config=model.config)
        if max_len is None:
            raise ValueError("a static cache needs max_len")
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=int(max_len))
    import mustafar

    return mustafar.MustafarCache(model, mustafar_config(kind, sparsity, kernel), max_cache_len=max_len)


def use_dense_attention(model, kind: str) -> str:
    """Switch ``model`` to the attention of a dense cache ``kind`` (a MustafarCache built before switched it to
    ``"mustafar"``) and return its name: ``"sdpa"`` for ``"dense"`` (``DynamicCache``, what transformers gives a
    user); for ``"static"`` (the compiled baseline) ``"sdpa_packed_gqa"`` (:mod:`mustafar.bench.gqa_sdpa`: a decode
    step reads each K / V row once instead of once per query head), which for MHA is ``"sdpa"``'s computation."""
    if kind not in DENSE_KINDS:
        raise ValueError(f"{kind!r} is not a dense cache kind; known: {DENSE_KINDS}")
    from mustafar.bench import gqa_sdpa

    name = gqa_sdpa.ATTN_NAME if kind == "static" else "sdpa"
    if getattr(model.config, "_attn_implementation", "sdpa") != name:
        model.set_attn_implementation(name)
    return name


def mustafar_config(kind: str, sparsity: float, kernel: str = "auto"):
    """The :class:`mustafar.MustafarConfig` :func:`make_cache` gives a MustafarCache of ``kind``
    (``"compressed"``, ``"compressed-fp8"``: e4m3 stored values + a float16 scale per token vector on both
    sides, ``"simulate"``) at K = V ``sparsity``."""
    import mustafar

    if kind not in MUSTAFAR_KINDS:
        raise ValueError(f"{kind!r} is not a MustafarCache kind; known: {MUSTAFAR_KINDS}")
    # the config's default decode kernel is "auto": name it only when another one is asked for
    chosen = {} if kernel == "auto" else {"decode_kernel": kernel}
    if kind == "compressed-fp8":
        chosen.update(k_value_dtype="fp8_e4m3", v_value_dtype="fp8_e4m3")
        kind = "compressed"
    return mustafar.MustafarConfig(k_sparsity=sparsity, v_sparsity=sparsity, mode=kind, **chosen)


def cache_nbytes(cache) -> int:
    """Bytes a cache holds: ``cache.nbytes()`` where it has one (MustafarCache), else the sum of its
    layers' ``keys`` / ``values`` tensors (DynamicCache, StaticCache)."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


# ------------------------------------------------------------------------------------------------ random fill
def text_config(model_or_config):
    """The decoder's text config of a model or config (multimodal configs nest it)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def kv_shape(model_or_config) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a model or config."""
    cfg = text_config(model_or_config)
    h_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(cfg.num_hidden_layers), int(h_kv), int(d)


def _drop_handoff(cache, layer: int) -> None:
    """Drop what an ``update`` of a MustafarCache leaves for the layer's attention call, which never
    comes in a fill (:meth:`mustafar.MustafarCache.discard_handoff`). Dense caches leave nothing."""
    discard = getattr(cache, "discard_handoff", None)
    if discard is not None:
        discard()


def fill_cache(model, cache, batch: int, length: int, seed: int = 0, tail: int = 0, chunk: int = 8192) -> None:
    """Fill ``cache`` up to ``length`` tokens with random K/V, without running the model.

    For every decoder layer ``cache.update(k, v, layer_idx)`` is called, as transformers'
    ``LlamaAttention`` calls it (5.17 passes no cache kwargs; 5.2x passes only its own kwargs, which
    no cache of ours reads), with ``k, v ~ N(0, 1)`` of shape ``[batch, n_kv_heads, n, head_dim]`` in
    the model's dtype on the model's device. One layer's tensors exist at a time. The cache may
    already hold tokens (``cache.get_seq_length()``): it is extended from there, so one cache can be
    measured at increasing contexts. ``DynamicCache``, ``StaticCache`` and ``MustafarCache`` work.

    * ``MustafarCache``: each layer gets the new tokens in one multi-token update, i.e. exactly the
      prefill path (everything but the last ``local_window`` tokens is pruned and bitmap-encoded, the
      window stays dense). Splitting it into chunks would take the cache's chunked-prompt path, which
      decodes the whole compressed part once per chunk, so it is not chunked. Extending a filled
      cache is one such call (the slow path once per layer, then the same state as after a prefill).
    * ``StaticCache``: written in chunks of ``chunk`` tokens (it appends in place).
    * ``DynamicCache``: one update per layer (it grows by ``torch.cat``; chunks would re-copy).

    Parameters
    ----------
    model : transformers model (its config, dtype and device are read)
    cache : the cache to fill
    batch, length : int
        Sequences, and the tokens the cache holds afterwards (>= those it holds now).
    seed : int
        Seed of the K/V draws (a ``torch.Generator`` on the model's device).
    tail : int
        The last ``tail`` of the new tokens are appended one token per ``update`` call, as decode
        steps append them (a MustafarCache keeps them in its dense window and compresses a chunk when
        the window exceeds ``local_window + compress_chunk``): used to place the window so that a
        chosen decode step compresses. A 1-token update is always such a decode-style append.
    chunk : int
        Tokens per ``update`` of a StaticCache.

    Notes
    -----
    Why random K/V are enough for speed: the timed decode steps run the real model (embedding,
    every layer's projections and MLP, attention over the cache, the LM head); only the prompt's
    K/V are drawn instead of computed by a prefill. The benchmark models have random weights, so
    a prefill would produce random K/V too, and the time of the kernels depends on the tensor
    shapes, the counts (tokens compressed, window rows) and the bitmaps' layout (a fixed number of
    set bits per token vector at a given sparsity), not on the values.
    """
    n_layers, h_kv, d = kv_shape(model)
    p = next(model.parameters())
    dev, dt = p.device, p.dtype
    start = int(cache.get_seq_length())
    n_new = int(length) - start
    if n_new < 0:
        raise ValueError(f"cache already holds {start} tokens > length={length}")
    tail = int(tail)
    if not 0 <= tail <= n_new:
        raise ValueError(f"tail={tail} must be in [0, {n_new}] (new tokens)")
    if n_new == 0:
        return
    bulk = n_new - tail
    static = type(cache).__name__ == "StaticCache"
    step = max(1, int(chunk)) if static else max(1, bulk)
    g = torch.Generator(device=dev).manual_seed(int(seed))

    def draw(n):  # [batch, H_kv, n, D] in the model's dtype
        return torch.randn((batch, h_kv, n, d), generator=g, device=dev, dtype=dt)

    with torch.no_grad():
        for layer in range(n_layers):
            for s0 in range(0, bulk, step):
                n = min(step, bulk - s0)
                k, v = draw(n), draw(n)
                cache.update(k, v, layer)
                _drop_handoff(cache, layer)
                del k, v
            if tail:
                k, v = draw(tail), draw(tail)
                for i in range(tail):
                    cache.update(k[:, :, i : i + 1], v[:, :, i : i + 1], layer)
                    _drop_handoff(cache, layer)
                del k, v


def prefill(model, cache, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """A real prefill of ``length`` random token ids into ``cache``; returns the greedy next token
    ids ``[batch, 1]``."""
    vocab, dev = model.config.vocab_size, next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), device=dev, generator=g)
    from mustafar import cache_kwargs

    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    return out.logits[:, -1:].argmax(-1)


def random_fill(model, cache, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """:func:`fill_cache` to ``length`` tokens; returns random next token ids ``[batch, 1]``."""
    fill_cache(model, cache, batch, length, seed=seed)
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    return torch.randint(0, model.config.vocab_size, (batch, 1), device=dev, generator=g)


#: how a decode benchmark fills its cache before the timed steps: ``fill(model, cache, batch, length)``
FILLS = {"prefill": prefill, "random": random_fill}


# ------------------------------------------------------------------------------------------------ environment / device
def sdpa_backends():
    """Context manager: SDPA restricted to the flash, memory-efficient and math backends.

    PyTorch's cuDNN SDPA backend builds a new cuDNN graph whenever the key length changes, i.e. at
    every decode step, which costs ~1.2-1.8 ms of CPU per attention call on the H200 and would make
    the dense baselines CPU-bound; every e2e run excludes it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


SDPA_BACKENDS_NOTE = "flash, efficient, math (cuDNN excluded)"


def mem_reset(device) -> None:
    """Synchronise and reset CUDA's peak-memory counter (nothing on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def mem_peak(device, base: int) -> float | None:
    """GiB allocated at the peak since :func:`mem_reset`, minus ``base`` bytes; ``None`` on the CPU."""
    return (torch.cuda.max_memory_allocated() - base) / GIB if torch.device(device).type == "cuda" else None


def free(device) -> None:
    """Collect garbage and return CUDA's cached blocks."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (``torch.OutOfMemoryError`` or its message)."""
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def loadavg() -> tuple[float, float, float] | None:
    """``os.getloadavg()`` where the platform has it, else ``None``."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)``; ``None`` keeps torch's default. Raises ``ValueError`` for ``n < 1``."""
    if n is None:
        return
    if int(n) < 1:
        raise ValueError(f"--threads={n} must be >= 1")
    torch.set_num_threads(int(n))


def require_cuda(prog: str, hint: str = "") -> bool:
    """True when CUDA is available; otherwise prints ``<prog>: needs a CUDA GPU<hint>`` to stderr."""
    if torch.cuda.is_available():
        return True
    print(f"{prog}: needs a CUDA GPU{hint}", file=sys.stderr)
    return False
