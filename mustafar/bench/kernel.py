"""Decode-attention kernel benchmark (issue #15): dense SDPA, an FP8 byte proxy, the unfused path and every
stored format of ours, side by side in one run, over a grid that spans the classes the cache accepts.

``python -m mustafar.bench kernel [--profile quick|full|targets|short|gqa] [--kernels v6 v6k ...] [--device cuda|cpu]
[--out results/kernel_<gpu>.json]``
(also ``python -m mustafar.bench.kernel``).

Grid (:data:`HEADS` x :data:`SPARSITIES` x :data:`POINTS`, ``--profile`` picks a subset, see
:data:`PROFILES`): query/KV heads and head_dim of real models (MHA 32/32 at D = 128 and 64, SmolLM2's
9/3 at D = 64, Llama-3-8B's 32/8, Qwen2.5-7B's 28/4, 32/4; Qwen2.5-14B's 40/8, -1.5B's 12/2 and -0.5B's 14/2 at
D = 64 for G = 5-7), sparsity 50-80 % (K = V), and (B, T) from a
single long sequence to B = 128, with lengths that are not powers of two. Per (heads, B, T) it times:

* ``dense_ms``: ``torch.nn.functional.scaled_dot_product_attention`` decode, q ``[B, H_q, 1, D]``, K/V
  ``[B, H_kv, T, D]`` in the model dtype (``enable_gqa``);
* ``fp8_proxy_ms``: **a proxy, not an FP8 kernel**: the same SDPA over T/2 tokens, i.e. the bytes an e4m3
  KV cache reads at dense efficiency (an upper bound on what FP8 KV decoding can gain from its bytes);

and per sparsity:

* ``fused_ms``: ``mustafar.ops.sparse_decode(kernel="auto")`` on the compressed cache (all T tokens
  compressed, values in the model dtype), and ``fused_<kernel>_ms`` for every CUDA kernel of :data:`KERNELS`
  that serves the configuration (a kernel that cannot raises ``ValueError`` and is recorded as ``None``). The
  compressed tensors are laid out as ``MustafarCache`` stores them (:func:`cache_layout`: ``round_up(T, 8)`` rows
  per ``(b, h)``, the first T used), so every ``(b, h)`` slice starts 16-byte aligned;
* ``fused_packed_ms`` (only where T is not a multiple of 8): the same ``"auto"`` call on the encoder's packed
  output (rows of consecutive heads back to back, so slices are not 16-byte aligned for an odd row width): what
  a caller of the op who hands it such tensors gets (v4-v6 stage them with element copies);
* ``fused_fp8_ms``: the same op with e4m3 stored values (+ a float16 scale per row) on both sides, and
  ``fused_fp8_<kernel>_ms`` for each kernel of :data:`FP8_KERNELS` by name;
* ``unfused_ms``: ``decode_bitmap`` of K and V, then the same SDPA;
* ``compress_256_ms``: ``prune_encode_topk`` of 256 new K and V tokens (the cache's chunk compression),
  reported against one fused decode step (``compress_256_over_step``).

Every output is checked against a float32 SDPA over the values the kernel must see (the decoded bitmap
rows; for FP8 the dequantized values): ``rel_err_*`` = ||out - ref|| / ||ref||. Times: on CUDA
:func:`mustafar.bench.common.gpu_bench_ms` (``triton.testing.do_bench`` median, L2 flushed before each
repetition); ``--device cpu`` (a smoke run of the same code: only ``"auto"``, no CUDA kernel) times with
:func:`mustafar.bench.common.time_ms`. Bytes read (``*_bytes``): dense ``2·B·H_kv·T·D·itemsize``; ours
``2·B·H_kv·T·(D/8 + k·itemsize)`` and with FP8 ``2·B·H_kv·T·(D/8 + k + 2)`` (bitmap words, kept values,
scale), plus q and the output; ``fp8_store_ratio`` = stored bytes per FP8 row / fp16 dense row. ``*_bw_frac`` = bytes / time / copy bandwidth (a device-to-device copy
timed the same way in the same run, counted as bytes read + written). Speed-ups are ratios of medians
measured in the same run: ``speedup_*`` over dense, ``*_over_fp8_proxy`` over the proxy.

Instructions per stored value are not measured here (they need Nsight Compute): ``scripts/ncu_sass_hot.py``
counts them from the SASS of a profiled launch.

:func:`summary` turns the rows into the issue's target checks (each with the measured value and the
shapes it covers); ``main`` prints it after the table.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from mustafar.bench.common import command_line, default_out, gpu_bench_ms, gpu_slug, require_cuda, time_ms, write_results

__all__ = ["KERNELS", "FP8_KERNELS", "HEADS", "SPARSITIES", "POINTS", "PROFILES", "Heads", "cache_layout", "copy_bandwidth",
           "format_read_bytes",
           "grid", "run", "summary", "main"]

#: the CUDA decode kernels ``mustafar.ops.sparse_decode(kernel=...)`` can be asked for, timed side by side
KERNELS = ("v7", "v7g", "v6", "v6g", "v6k", "v5", "v4")
#: the kernels that read e4m3 values, timed side by side on them (``fused_fp8_<kernel>_ms``)
FP8_KERNELS = ("v7", "v6")


@dataclass(frozen=True)
class Heads:
    """One attention geometry of the grid: ``h_q`` query heads over ``h_kv`` KV heads of ``d`` channels,
    benchmarked in ``dtype`` (the model dtype: q, the window and 16-bit stored values)."""
    name: str
    h_q: int
    h_kv: int
    d: int
    dtype: str

    @property
    def group(self) -> int:
        return self.h_q // self.h_kv


#: geometries of real models: G = 1, 3, 4, 5, 6, 7, 8; D = 64 and 128; fp16 and bf16
HEADS = (
    Heads("MHA 32/32 D128", 32, 32, 128, "float16"),   # Llama-2-7B
    Heads("MHA 32/32 D64", 32, 32, 64, "float16"),
    Heads("G3 9/3 D64", 9, 3, 64, "float16"),          # SmolLM2-135M
    Heads("G4 32/8 D128", 32, 8, 128, "bfloat16"),     # Llama-3-8B
    Heads("G7 28/4 D128", 28, 4, 128, "bfloat16"),     # Qwen2.5-7B
    Heads("G8 32/4 D128", 32, 4, 128, "float16"),
    Heads("G5 40/8 D128", 40, 8, 128, "bfloat16"),     # Qwen2.5-14B
    Heads("G6 12/2 D128", 12, 2, 128, "bfloat16"),     # Qwen2.5-1.5B
    Heads("G7 14/2 D64", 14, 2, 64, "bfloat16"),       # Qwen2.5-0.5B
)
#: the geometries of issue #15's classes (the quick grid)
_CORE = ("MHA 32/32 D128", "MHA 32/32 D64", "G3 9/3 D64", "G4 32/8 D128", "G7 28/4 D128", "G8 32/4 D128")
SPARSITIES = (0.5, 0.6, 0.7, 0.8)
#: (B, T): one long sequence, odd batches and lengths, many short sequences
POINTS = ((1, 1024), (1, 32768), (1, 131072), (3, 12345), (5, 5000), (8, 16384), (32, 4096), (128, 1024))

#: ``--profile``: which heads (by name; None = all), sparsities and (B, T) points run
PROFILES = {
    "full": dict(heads=None, sparsities=SPARSITIES, points=POINTS),
    "quick": dict(heads=_CORE, sparsities=(0.5, 0.7), points=((1, 32768), (3, 12345), (8, 16384), (32, 4096))),
    "targets": dict(heads=("MHA 32/32 D128", "G4 32/8 D128"), sparsities=(0.5, 0.7), points=((1, 32768), (8, 16384))),
    # every geometry but MHA D64 at the two target points: a short device call that times a kernel change per G
    "short": dict(heads=("MHA 32/32 D128", "G3 9/3 D64", "G4 32/8 D128", "G7 28/4 D128", "G8 32/4 D128"),
                  sparsities=(0.5, 0.7), points=((1, 32768), (8, 16384))),
    # the 8-slot class (G = 5-8; D = 64 and 128) at every sparsity and the two target points: where "auto" runs v6k
    "gqa": dict(heads=("G5 40/8 D128", "G6 12/2 D128", "G7 14/2 D64", "G8 32/4 D128"),
                sparsities=SPARSITIES, points=((1, 32768), (8, 16384))),
}


def grid(profile: str = "quick", heads=None, sparsities=None, points=None):
    """``(heads list, sparsities, points)`` of a profile, each overridable."""
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}: expected one of {', '.join(PROFILES)}")
    p = PROFILES[profile]
    names = p["heads"]
    hs = list(heads) if heads is not None else [h for h in HEADS if names is None or h.name in names]
    return hs, tuple(sparsities or p["sparsities"]), tuple(points or p["points"])


def format_read_bytes(b: int, h_q: int, h_kv: int, t: int, d: int, sparsity: float, dtype: torch.dtype,
                      fp8: bool = False) -> int:
    """Bytes one decode call reads and writes in our format: ``B·H_kv·T`` stored K and V rows of
    :func:`mustafar.format.format_bytes` each (bitmap + kept values, FP8 with its scale), plus q and the output."""
    from mustafar.format import format_bytes

    row = format_bytes(d, sparsity, dtype, torch.float8_e4m3fn if fp8 else None)
    return 2 * b * h_kv * t * row + 2 * b * h_q * d * torch.tensor([], dtype=dtype).element_size()


def cache_layout(x: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, ...]`` as MustafarCache lays out its compressed store: a buffer of ``round_up(T, 8)`` rows per
    ``(b, h)`` (``mustafar.cache.layers.round_up``), its first ``T`` rows filled (a view); ``x`` itself when ``T`` is a
    multiple of 8. Every ``(b, h)`` slice then starts 16-byte aligned for any row width, which the v4-v6 kernels
    stage with 16-byte copies (element copies otherwise)."""
    from mustafar.cache.layers import round_up

    t = x.shape[2]
    if t % 8 == 0:
        return x
    buf = x.new_zeros(*x.shape[:2], round_up(t), *x.shape[3:])
    buf[:, :, :t] = x
    return buf[:, :, :t]


def copy_bandwidth(device: str = "cuda") -> float:
    """Copy bandwidth in bytes/s (bytes read + bytes written) of a 1 GiB (CUDA) / 64 MiB (CPU) copy."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = _timer(device)(lambda: b.copy_(a))
    return 2 * n / (ms * 1e-3)


def _timer(device: str):
    if device == "cuda":
        return gpu_bench_ms
    return lambda fn: time_ms(fn, reps=10, warmup=2, device=device)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def run(profile: str = "quick", heads=None, sparsities=None, points=None, device: str = "cuda",
        mem_budget_gib: float = 100.0, log=print, progress: bool = True, on_cell=None, kernels=KERNELS) -> dict:
    """Time the grid of ``profile`` (see the module doc); ``heads`` / ``sparsities`` / ``points`` override it.
    ``kernels``: the CUDA kernels timed by name beside ``"auto"`` (a subset of :data:`KERNELS`; default all).
    A (heads, B, T) whose dense K + V (x 4 for the float32 reference and the compressed copies) exceeds
    ``mem_budget_gib`` is skipped and listed under ``skipped``. ``on_cell(result)`` is called after every
    (heads, B, T) with the result so far (``main`` rewrites the output file there, so a run cut short
    keeps what it measured).

    Returns
    -------
    dict
        ``copy_bandwidth_Bps``, ``rows`` (one dict per heads x B x T x sparsity), ``skipped``.
    """
    from mustafar import ops
    from mustafar.format import format_bytes, kept_count
    from mustafar.ops import reference as R

    if device == "cuda":
        assert ops.backend("cuda") == "cuda", f"CUDA kernels not available: backend={ops.backend('cuda')}"
    hs, sps, pts = grid(profile, heads, sparsities, points)
    bad = [x for x in kernels if x not in KERNELS]
    if bad:
        raise ValueError(f"kernels={bad}: expected names from {', '.join(KERNELS)}")
    kernels = tuple(kernels)
    timer = _timer(device)
    bw = copy_bandwidth(device)
    log(f"copy bandwidth: {bw / 1e12:.3f} TB/s (read + write)")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gen = torch.Generator(device=device).manual_seed(0)
    rows, skipped = [], []
    cells = [(h, b, t) for h in hs for (b, t) in pts]
    try:
        from tqdm.auto import tqdm
        it = tqdm(cells, desc="kernel grid", disable=not progress)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        it = cells
    for h, b, t in it:
        dt = getattr(torch, h.dtype)
        isz = torch.tensor([], dtype=dt).element_size()
        d, gqa = h.d, h.h_q != h.h_kv
        dense_bytes = 2 * b * h.h_kv * t * d * isz
        if dense_bytes * 4 > mem_budget_gib * (1 << 30):
            skipped.append(dict(heads=h.name, B=b, T=t, why=f"{dense_bytes / 2**30:.1f} GiB dense K+V over budget"))
            continue
        q = torch.randn(b, h.h_q, d, device=device, generator=gen).to(dt)
        kd = torch.randn(b, h.h_kv, t, d, device=device, generator=gen).to(dt)
        vd = torch.randn(b, h.h_kv, t, d, device=device, generator=gen).to(dt)
        q4 = q.unsqueeze(2)
        scale = 1.0 / math.sqrt(d)

        def attn(k_, v_, q4=q4, gqa=gqa):
            return sdpa(q4, k_, v_, scale=scale, enable_gqa=gqa).squeeze(2)

        t_dense = timer(lambda: attn(kd, vd))
        kh, vh = kd[:, :, : t // 2].contiguous(), vd[:, :, : t // 2].contiguous()
        t_proxy = timer(lambda: attn(kh, vh))
        del kh, vh
        empty = q.new_empty(b, h.h_kv, 0, d)
        for s in sps:
            k = kept_count(d, s)
            kb_p, kv_p = ops.prune_encode_topk(kd, k)  # packed: row T of (b, h) follows row T-1 of (b, h-1)
            vb_p, vv_p = ops.prune_encode_topk(vd, k)
            # the layout MustafarCache stores (and the timed calls read): capacity rounded up to 8 rows, the first T
            kb, kv, vb, vv = (cache_layout(x) for x in (kb_p, kv_p, vb_p, vv_p))
            k8, ks = (cache_layout(x) for x in R.quantize_fp8(kv_p))
            v8, vs = (cache_layout(x) for x in R.quantize_fp8(vv_p))

            def fused(kernel="auto", fp8=False, kb=kb, kv=kv, vb=vb, vv=vv, k8=k8, ks=ks, v8=v8, vs=vs):
                if fp8:
                    return ops.sparse_decode(q, kb, k8, vb, v8, empty, empty, None, scale, k_scale=ks, v_scale=vs,
                                             kernel=kernel)
                return ops.sparse_decode(q, kb, kv, vb, vv, empty, empty, None, scale, kernel=kernel)

            def unfused(kb=kb, kv=kv, vb=vb, vv=vv):
                return attn(ops.decode_bitmap(kb, kv, d), ops.decode_bitmap(vb, vv, d))

            qf = q4.float()
            ref16 = sdpa(qf, R.decode_bitmap(kb, kv.float(), d), R.decode_bitmap(vb, vv.float(), d), scale=scale,
                         enable_gqa=gqa).squeeze(2)
            ref8 = sdpa(qf, R.decode_bitmap(kb, k8.float() * ks.float()[..., None], d),
                        R.decode_bitmap(vb, v8.float() * vs.float()[..., None], d), scale=scale,
                        enable_gqa=gqa).squeeze(2)
            row = dict(heads=h.name, H_q=h.h_q, H_kv=h.h_kv, G=h.group, D=d, dtype=h.dtype, B=b, T=t, sparsity=s,
                       k=k, dense_ms=t_dense, fp8_proxy_ms=t_proxy)
            row["rel_err_fused"] = _rel(fused(), ref16)
            row["fused_ms"] = timer(fused)
            row["rel_err_fused_fp8"] = _rel(fused(fp8=True), ref8)
            row["fused_fp8_ms"] = timer(lambda: fused(fp8=True))
            # every CUDA kernel by name (16-bit values: KERNELS; e4m3 values: FP8_KERNELS), where it serves the call
            for kerns, fp8 in ((kernels, False), (tuple(x for x in FP8_KERNELS if x in kernels), True)):
                for kern in (kerns if device == "cuda" else ()):
                    name = ("fp8_" if fp8 else "") + kern
                    try:
                        row[f"rel_err_{name}"] = _rel(fused(kernel=kern, fp8=fp8), ref8 if fp8 else ref16)
                    except ValueError:  # the kernel does not serve this configuration
                        row[f"fused_{name}_ms"] = row[f"rel_err_{name}"] = None
                        continue
                    row[f"fused_{name}_ms"] = timer(lambda kern=kern, fp8=fp8: fused(kernel=kern, fp8=fp8))
            if t % 8:  # the op on the encoder's packed rows too (cache_layout copied them; slices not 16-byte aligned)
                packed = dict(kb=kb_p, kv=kv_p, vb=vb_p, vv=vv_p)
                row["rel_err_fused_packed"] = _rel(fused(**packed), ref16)
                row["fused_packed_ms"] = timer(lambda: fused(**packed))
            row["rel_err_unfused"] = _rel(unfused(), ref16)
            row["unfused_ms"] = timer(unfused)
            kn, vn = kd[:, :, :256].contiguous(), vd[:, :, :256].contiguous()
            row["compress_256_ms"] = timer(lambda k=k: (ops.prune_encode_topk(kn, k), ops.prune_encode_topk(vn, k)))
            row["compress_256_over_step"] = row["compress_256_ms"] / row["fused_ms"]
            row["dense_bytes"] = dense_bytes + 2 * b * h.h_q * d * isz
            row["fused_bytes"] = format_read_bytes(b, h.h_q, h.h_kv, t, d, s, dt)
            row["fused_fp8_bytes"] = format_read_bytes(b, h.h_q, h.h_kv, t, d, s, dt, fp8=True)
            row["bytes_ratio"] = row["fused_bytes"] / row["dense_bytes"]
            row["fp8_bytes_ratio"] = row["fused_fp8_bytes"] / row["dense_bytes"]
            row["fused_floor_ms"] = row["fused_bytes"] / bw * 1e3
            row["fp8_store_ratio"] = format_bytes(d, s, torch.float16, torch.float8_e4m3fn) / (2 * d)  # vs fp16 dense
            row["speedup_fp8_proxy"] = t_dense / t_proxy
            for name in (["fused", "fused_fp8", "unfused"] + [f"fused_{x}" for x in kernels]
                         + [f"fused_fp8_{x}" for x in FP8_KERNELS if f"fused_fp8_{x}_ms" in row]
                         + (["fused_packed"] if "fused_packed_ms" in row else [])):
                ms = row.get(f"{name}_ms")
                row[f"speedup_{name}"] = t_dense / ms if ms else None
                row[f"{name}_over_fp8_proxy"] = t_proxy / ms if ms else None
            row["dense_bw_frac"] = row["dense_bytes"] / (t_dense * 1e-3) / bw
            row["fused_bw_frac"] = row["fused_bytes"] / (row["fused_ms"] * 1e-3) / bw
            row["fused_fp8_bw_frac"] = row["fused_fp8_bytes"] / (row["fused_fp8_ms"] * 1e-3) / bw
            rows.append(row)
            per = " ".join(f"{x} {row[f'speedup_fused_{x}']:.2f}x" for x in kernels if row.get(f"speedup_fused_{x}"))
            log(f"{h.name} {h.dtype} B={b} T={t} s={s:.1f}: dense {t_dense:.4f} ms, fp8 proxy {t_proxy:.4f} ms; "
                f"auto {row['fused_ms']:.4f} ms ({row['speedup_fused']:.2f}x, {row['fused_bw_frac'] * 100:.0f}% bw) "
                f"[{per}] fp8 {row['speedup_fused_fp8']:.2f}x ({row['fused_fp8_over_fp8_proxy']:.2f}x proxy"
                + "".join(f", {x} {row[f'fused_fp8_{x}_over_fp8_proxy']:.2f}x" for x in FP8_KERNELS
                          if row.get(f"fused_fp8_{x}_over_fp8_proxy")) + ") "
                f"unfused {row['speedup_unfused']:.2f}x; rel err {row['rel_err_fused']:.1e} / fp8 "
                f"{row['rel_err_fused_fp8']:.1e}")
            del kb, kv, vb, vv, k8, ks, v8, vs
        del q, kd, vd
        if device == "cuda":
            torch.cuda.empty_cache()
        if on_cell is not None:
            on_cell({"copy_bandwidth_Bps": bw, "rows": rows, "skipped": skipped, "complete": False})
    return {"copy_bandwidth_Bps": bw, "rows": rows, "skipped": skipped, "complete": True}


def _best(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return max(vals) if vals else None


def summary(rows) -> list[dict]:
    """The issue's targets against the rows: one dict per target with ``target`` (text), ``need`` (the
    threshold), ``got`` (the measured value: the worst row for a "every shape" target, else the row's value;
    None when the grid has no such row), ``ok`` and ``rows`` (how many rows it covers). Uses the default
    kernel (``fused_ms``: what a cache gets), not the best of the kernels timed."""
    def pick(**kw):
        return [r for r in rows if all(abs(r[k] - v) < 1e-9 if isinstance(v, float) else r[k] == v
                                       for k, v in kw.items())]

    out = []

    def add(target, need, sel, key, worst=False):
        vals = [r[key] for r in sel if r.get(key) is not None]
        got = (min(vals) if worst else max(vals)) if vals else None
        out.append(dict(target=target, need=need, got=got, ok=None if got is None else got >= need, rows=len(vals)))

    cover = [r for r in rows if abs(r["sparsity"] - 0.7) < 1e-9 and r["B"] * r["T"] >= 16384]
    add("70 %, every shape with B*T >= 16K: fused >= 1.0x dense", 1.0, cover, "speedup_fused", worst=True)
    mha = dict(H_q=32, H_kv=32, D=128, dtype="float16")
    add("MHA D128 fp16 B=8 T=16K 70 %: >= 2.0x dense", 2.0, pick(**mha, B=8, T=16384, sparsity=0.7), "speedup_fused")
    add("MHA D128 fp16 B=8 T=16K 50 %: >= 1.4x dense", 1.4, pick(**mha, B=8, T=16384, sparsity=0.5), "speedup_fused")
    add("MHA D128 fp16 B=1 T=32K 70 %: >= 1.5x dense", 1.5, pick(**mha, B=1, T=32768, sparsity=0.7), "speedup_fused")
    add("MHA D128 fp16 B=8 T=16K 70 %: >= 75 % of copy bandwidth", 0.75,
        pick(**mha, B=8, T=16384, sparsity=0.7), "fused_bw_frac")
    add("sparse + FP8 70 % MHA B=8 T=16K: >= 1.25x FP8 proxy", 1.25,
        pick(H_q=32, H_kv=32, D=128, B=8, T=16384, sparsity=0.7), "fused_fp8_over_fp8_proxy")
    add("sparse + FP8 70 % G=4 B=8 T=16K: >= 1.25x FP8 proxy", 1.25,
        pick(G=4, D=128, B=8, T=16384, sparsity=0.7), "fused_fp8_over_fp8_proxy")
    ratios = [r["fp8_store_ratio"] for r in pick(D=128, sparsity=0.7)]
    out.append(dict(target="sparse + FP8 70 % D=128: bytes <= 0.22 of fp16 dense", need=0.22,
                    got=max(ratios) if ratios else None,
                    ok=None if not ratios else max(ratios) <= 0.22, rows=len(ratios)))
    comp = [r["compress_256_over_step"] for r in rows]
    out.append(dict(target="compression of 256 tokens < one decode step", need=1.0, got=max(comp) if comp else None,
                    ok=None if not comp else max(comp) < 1.0, rows=len(comp)))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m mustafar.bench kernel", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="quick", choices=list(PROFILES), help="grid subset (default quick)")
    ap.add_argument("--quick", dest="profile", action="store_const", const="quick", help="= --profile quick")
    ap.add_argument("--targets", dest="profile", action="store_const", const="targets", help="= --profile targets")
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS), metavar="KERNEL",
                    help=f"CUDA kernels timed by name beside auto (default all: {' '.join(KERNELS)})")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cuda (default); cpu runs the same code as a smoke test (op 'auto' only)")
    ap.add_argument("--out", default=None, help="output JSON (default results/kernel_<gpu>.json on CUDA, e.g. _h100)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not require_cuda("python -m mustafar.bench kernel", " (--device cpu: a smoke run)"):
        return 2
    name = f"kernel_{gpu_slug()}.json" if args.device == "cuda" else "kernel_cpu_smoke.json"
    path, cmd = args.out or default_out(name), command_line("kernel", argv)

    def save(res):
        res["summary"] = summary(res["rows"])
        return write_results(path, res, cmd)

    res = run(profile=args.profile, device=args.device, on_cell=save, kernels=args.kernels)
    out = save(res)
    print(f"wrote {out}")
    print(f"{'heads':>15} {'dtype':>8} {'B':>3} {'T':>6} {'s':>4} {'dense':>8} {'auto':>8} {'x':>5} {'bw%':>4} "
          + " ".join(f"{x + ' x':>6}" for x in KERNELS) + f" {'fp8 x':>6} {'/prx':>5} {'unf x':>5}")
    for r in res["rows"]:
        ks = " ".join(f"{r[f'speedup_fused_{x}']:6.2f}" if r.get(f"speedup_fused_{x}") else "     -" for x in KERNELS)
        print(f"{r['heads']:>15} {r['dtype']:>8} {r['B']:>3} {r['T']:>6} {r['sparsity']:>4} {r['dense_ms']:8.4f} "
              f"{r['fused_ms']:8.4f} {r['speedup_fused']:5.2f} {r['fused_bw_frac'] * 100:4.0f} {ks} "
              f"{r['speedup_fused_fp8']:6.2f} {r['fused_fp8_over_fp8_proxy']:5.2f} {r['speedup_unfused']:5.2f}")
    for s in res["summary"]:
        got = "-" if s["got"] is None else f"{s['got']:.3f}"
        print(f"[{'ok' if s['ok'] else 'MISS' if s['ok'] is False else 'n/a'}] {s['target']}: {got} ({s['rows']} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
