#!/usr/bin/env python3
"""Time the gap-code decode prototype (``csrc/proto/gap_decode.cuh``) as a whole decode kernel, side by side in one
run with torch SDPA dense decode, the ideal FP8 proxy (SDPA over T/2 tokens: the same bytes as an e4m3 cache) and
the extension's op on the paper's bitmap format (``kernel="auto"``: v6 / v6k as routed today) over the same top-k
pruned rows (issue #15: prototype the next layout before moving the cache and the op to it).

Shapes: the issue's table (MHA 32/32 D=128 at B=8 T=16K, 50-80 %; B=3 T=12345; 28/4 bf16; 9/3 at D=64; 32/8 bf16
B=32 T=4K 50 %) plus B=1 T=32K rows (MHA, 9/3 at D=64, 32/4) and 32/4 at B=8 T=16K; then the same kernel with e4m3
values (``*_fp8``: a float16 scale per token and side, :func:`mustafar.ops.reference.quantize_fp8`'s rule, fp16
models) beside the bitmap op with e4m3 values, at the issue's FP8 target shapes (MHA and 32/8 at B=8 T=16K 70 %)
and a few more. Per shape: each path's median
time (``mustafar.bench.common.gpu_bench_ms``: L2 flushed before every repetition), speed-up over dense and over the
FP8 proxy, bytes read and the fraction of copy bandwidth (measured in the same run), and the relative error of
each path against the float32 SDPA of its own pruned rows (every shape checked before it is timed; inputs
``randn``, never zeros; left padding (kv_start) checked on one shape).

    python scripts/gap_decode_bench.py --build-only      # first, alone (the build takes minutes)
    python scripts/gap_decode_bench.py [--only NAME ...] [--append] [--out results/gap_decode_<gpu>.json]

The prototype extension is built on first use (torch.utils.cpp_extension.load). CPU tests cover :data:`SHAPES`,
:func:`gap_inputs` and :func:`reference`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclass(frozen=True)
class Shape:
    name: str
    h_q: int
    h_kv: int
    d: int
    b: int
    t: int
    sparsity: float
    dtype: str = "float16"
    values: str = "model"  # stored values: the model's dtype, or "fp8_e4m3" (both sides)


SHAPES = (
    Shape("mha_b8_t16k_70", 32, 32, 128, 8, 16384, 0.7),
    Shape("mha_b8_t16k_50", 32, 32, 128, 8, 16384, 0.5),
    Shape("mha_b8_t16k_60", 32, 32, 128, 8, 16384, 0.6),
    Shape("mha_b8_t16k_80", 32, 32, 128, 8, 16384, 0.8),
    Shape("mha_b1_t32k_70", 32, 32, 128, 1, 32768, 0.7),
    Shape("mha_b3_t12345_70", 32, 32, 128, 3, 12345, 0.7),
    Shape("g7_28x4_bf16_b8_t16k_70", 28, 4, 128, 8, 16384, 0.7, "bfloat16"),
    Shape("g8_32x4_b8_t16k_70", 32, 4, 128, 8, 16384, 0.7),
    Shape("g8_32x4_b1_t32k_70", 32, 4, 128, 1, 32768, 0.7),
    Shape("g3_d64_9x3_b32_t4k_70", 9, 3, 64, 32, 4096, 0.7),
    Shape("g3_d64_9x3_b1_t32k_70", 9, 3, 64, 1, 32768, 0.7),
    Shape("g4_32x8_bf16_b32_t4k_50", 32, 8, 128, 32, 4096, 0.5, "bfloat16"),
    Shape("mha_b8_t16k_70_fp8", 32, 32, 128, 8, 16384, 0.7, values="fp8_e4m3"),
    Shape("g4_32x8_b8_t16k_70_fp8", 32, 8, 128, 8, 16384, 0.7, values="fp8_e4m3"),
    Shape("mha_b1_t32k_70_fp8", 32, 32, 128, 1, 32768, 0.7, values="fp8_e4m3"),
    Shape("mha_b8_t16k_50_fp8", 32, 32, 128, 8, 16384, 0.5, values="fp8_e4m3"),
    Shape("g8_32x4_b8_t16k_70_fp8", 32, 4, 128, 8, 16384, 0.7, values="fp8_e4m3"),
    Shape("g3_d64_9x3_b32_t4k_70_fp8", 9, 3, 64, 32, 4096, 0.7, values="fp8_e4m3"),
)


def gap_inputs(x: torch.Tensor, k: int, chunk: int = 1 << 20, fp8: bool = False):
    """``x [B, H, T, D]`` top-k pruned and gap-coded with 4-aligned slots, in the kernel's tile-major layout:
    ``(codes int32 [B, H, ntile, NC, 32], values [B, H, ntile, S/4, 32, 4], the dense pruned rows [B, H, T, D],
    scales)``. ``fp8``: the values quantized per token (:func:`mustafar.ops.reference.quantize_fp8`: the slots of a
    row, fillers 0, share one float16 scale) as float8_e4m3fn, ``scales`` float16 ``[B, H, ntile, 32]`` (0 on the
    padding rows) and the dense rows dequantized (float32); else ``scales`` is None. Encoded ``chunk`` rows at a
    time (the encoder's temporaries are ~40 bytes per channel)."""
    from mustafar import gapcode
    from mustafar.ops.reference import quantize_fp8

    b, h, t, d = x.shape
    flat = x.reshape(b * h, t, d)
    per = max(1, chunk // max(t, 1))
    codes, vals, dense, scales = [], [], [], []
    for i in range(0, b * h, per):
        g = gapcode.encode(flat[i:i + per], k, align=4)
        if fp8:
            q8, sc = quantize_fp8(g.values)  # [n, T, S], [n, T]
            deq = gapcode.GapKV(g.codes, q8.float() * sc.float().unsqueeze(-1), g.head_dim, g.k)
            dense.append(gapcode.decode(deq))
            g = gapcode.GapKV(g.codes, q8.view(torch.uint8), g.head_dim, g.k)  # layout moves on bytes
            nt = -(-t // gapcode.TILE)
            scales.append(torch.nn.functional.pad(sc, (0, nt * gapcode.TILE - t)).reshape(sc.shape[0], nt,
                                                                                        gapcode.TILE))
        else:
            dense.append(gapcode.decode(g))
        c, v = gapcode.tile_major(g)
        codes.append(c)
        vals.append(v)
    cat = lambda xs: torch.cat(xs).reshape(b, h, *xs[0].shape[1:])  # noqa: E731
    v = cat(vals)
    return cat(codes), (v.view(torch.float8_e4m3fn) if fp8 else v), cat(dense), (cat(scales) if fp8 else None)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kv_start=None) -> torch.Tensor:
    """float32 decode attention ``[B, Hq, D]`` of ``q [B, Hq, D]`` over ``k, v [B, Hkv, T, D]`` (GQA by repeat),
    tokens before ``kv_start[b]`` masked."""
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("bhd,bhtd->bht", q.float(), kf) * scale
    if kv_start is not None:
        pos = torch.arange(k.shape[2], device=k.device)
        s = s.masked_fill(pos[None, None, :] < kv_start.to(k.device)[:, None, None], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", s.softmax(dim=-1), vf)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="shape names (default all)")
    ap.add_argument("--nwarps", type=int, nargs="*", default=[8], help="warps per CTA of the prototype (the best "
                    "of these is reported, each one's time kept)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--build-only", action="store_true", help="build (or load) the prototype extension and exit: "
                    "run it first, alone, on a fresh machine (the build takes minutes)")
    ap.add_argument("--append", action="store_true", help="add the rows to those already in --out (one process per "
                    "shape: a crash loses one shape, not the run)")
    ap.add_argument("--list", action="store_true", help="print the shape names and exit")
    args = ap.parse_args(argv)
    if args.list:
        print(" ".join(s.name for s in SHAPES))
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.utils.cpp_extension import load
    from tqdm.auto import tqdm

    from mustafar import ops
    from mustafar.ops import reference as R
    from mustafar.bench.common import default_out, gpu_bench_ms, gpu_slug, write_results
    from mustafar.bench.kernel import _rel, cache_layout, copy_bandwidth
    from mustafar.ops.build import _cuda_arch_flags
    from mustafar.pruning._common import kept_count

    ext = load(name="mustafar_proto_gap", sources=[os.path.join(ROOT, "csrc", "proto", "gap_decode_ext.cu")],
               extra_include_paths=[os.path.join(ROOT, "csrc")],
               extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-split-compile=0"] + _cuda_arch_flags(),
               verbose=False)
    if args.build_only:
        print(f"built {ext.__file__}")
        return 0
    shapes = [s for s in SHAPES if args.only is None or s.name in args.only]
    bad = set(args.only or ()) - {s.name for s in SHAPES}
    if bad:
        raise SystemExit(f"unknown shapes {sorted(bad)}: expected names from {[s.name for s in SHAPES]}")
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e12:.3f} TB/s (read + write)")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, ok = [], True
    out_path = args.out or default_out(f"gap_decode_{gpu_slug()}.json")
    cmd = "python scripts/gap_decode_bench.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    if args.append and os.path.exists(out_path):
        import json

        with open(out_path) as f:
            old = json.load(f)
        rows, ok = old["rows"], old["checked"]
    save = lambda: write_results(out_path, {"copy_bandwidth_Bps": bw, "rows": rows, "checked": ok}, cmd)  # noqa: E731
    for sh in tqdm(shapes, desc="gap decode"):
        dt = getattr(torch, sh.dtype)
        isz = 2
        f8 = sh.values == "fp8_e4m3"
        vsz = 1 if f8 else isz  # bytes per stored value
        d, g = sh.d, sh.h_q // sh.h_kv
        k = kept_count(d, sh.sparsity)
        q = torch.randn(sh.b, sh.h_q, d, device="cuda", generator=gen).to(dt)
        kd = torch.randn(sh.b, sh.h_kv, sh.t, d, device="cuda", generator=gen).to(dt)
        vd = torch.randn(sh.b, sh.h_kv, sh.t, d, device="cuda", generator=gen).to(dt)
        scale = 1.0 / math.sqrt(d)
        q4 = q.unsqueeze(2)
        attn = lambda k_, v_: sdpa(q4, k_, v_, scale=scale, enable_gqa=g > 1).squeeze(2)  # noqa: E731
        kc, kv, kp, ksc = gap_inputs(kd, k, fp8=f8)
        vc, vv, vp, vsc = gap_inputs(vd, k, fp8=f8)
        s_slots = kv.shape[3] * 4
        none = torch.empty(0, dtype=torch.int32, device="cuda")
        noscale = torch.empty(0, dtype=torch.float16, device="cuda")
        ksc_, vsc_ = (ksc, vsc) if f8 else (noscale, noscale)
        gap_call = lambda nw=8, ks=none: ext.gap_decode(q, kc, kv, vc, vv, ksc_, vsc_, sh.t, ks, scale, nw, 0)  # noqa: E731
        gap = lambda nw=8, ks=none: gap_call(nw, ks)[0]  # noqa: E731
        row = dict(asdict(sh), G=g, k=k, slots=s_slots)
        ref = reference(q, kp, vp, scale)
        tqdm.write(f"{sh.name}: S={s_slots}, checking the gap kernel")
        row["rel_err_gap"] = _rel(gap(), ref)
        torch.cuda.synchronize()
        tqdm.write(f"{sh.name}: checking the bitmap op")
        # the extension's op on the bitmap format of the same rows (its own top-k: ties may pick other channels)
        kb_p, kv_p = ops.prune_encode_topk(kd, k)
        vb_p, vv_p = ops.prune_encode_topk(vd, k)
        kb, vb = cache_layout(kb_p), cache_layout(vb_p)
        empty = q.new_empty(sh.b, sh.h_kv, 0, d)
        if f8:  # e4m3 values with a float16 scale per row, as MustafarCache(k_value_dtype="fp8_e4m3") stores them
            (kvals, ks8), (vvals, vs8) = ([cache_layout(y) for y in R.quantize_fp8(x)] for x in (kv_p, vv_p))
            bitmap = lambda: ops.sparse_decode(q, kb, kvals, vb, vvals, empty, empty, None, scale,  # noqa: E731
                                               k_scale=ks8, v_scale=vs8)
            kf, vf = kvals.float() * ks8.float()[..., None], vvals.float() * vs8.float()[..., None]
        else:
            kvals, vvals = cache_layout(kv_p), cache_layout(vv_p)
            bitmap = lambda: ops.sparse_decode(q, kb, kvals, vb, vvals, empty, empty, None, scale)  # noqa: E731
            kf, vf = kvals.float(), vvals.float()
        del kb_p, kv_p, vb_p, vv_p
        ref_bm = reference(q, R.decode_bitmap(kb, kf, d), R.decode_bitmap(vb, vf, d), scale)
        del kf, vf
        row["rel_err_bitmap_auto"] = _rel(bitmap(), ref_bm)
        if sh.name == "mha_b3_t12345_70":  # left padding: the first 1000 / 0 / 77 tokens masked
            ks = torch.tensor([1000, 0, 77], dtype=torch.int32, device="cuda")
            row["rel_err_gap_kv_start"] = _rel(gap(ks=ks), reference(q, kp, vp, scale, ks))
        errs = [v for kk, v in row.items() if kk.startswith("rel_err")]
        if not all(e < 1e-2 for e in errs):
            ok = False
            print(f"{sh.name}: rel err over 1e-2: {[(kk, v) for kk, v in row.items() if kk.startswith('rel_err')]}")
        row["dense_ms"] = gpu_bench_ms(lambda: attn(kd, vd))
        kh, vh = kd[:, :, : sh.t // 2].contiguous(), vd[:, :, : sh.t // 2].contiguous()
        row["fp8_proxy_ms"] = gpu_bench_ms(lambda: attn(kh, vh))
        del kh, vh
        row["bitmap_auto_ms"] = gpu_bench_ms(bitmap)
        tried = []
        for nw in args.nwarps:
            try:  # a CTA of nw warps may not fit (shared memory, the kernel's launch bounds): recorded, skipped
                gap(nw)
            except RuntimeError as e:
                row[f"gap_w{nw}_ms"] = None
                row[f"gap_w{nw}_error"] = str(e).splitlines()[0]
                continue
            row[f"gap_w{nw}_ms"] = gpu_bench_ms(lambda nw=nw: gap(nw))
            tried.append(nw)
        best = min(tried, key=lambda nw: row[f"gap_w{nw}_ms"])
        row["gap_nwarps"] = best
        row["gap_ms"] = row[f"gap_w{best}_ms"]
        row["gap_nsplit"] = int(gap_call(best)[1])
        qo = 2 * sh.b * sh.h_q * d * isz  # q read + output written
        row["dense_bytes"] = 2 * sh.b * sh.h_kv * sh.t * d * isz + qo
        # the tiles as stored (last one padded), scales included
        row["gap_bytes"] = 2 * (kc.numel() * 4 + kv.numel() * vsz + (ksc.numel() * 2 if f8 else 0)) + qo
        row["bitmap_bytes"] = 2 * sh.b * sh.h_kv * sh.t * (d // 8 + k * vsz + (2 if f8 else 0)) + qo
        for name in ("fp8_proxy", "bitmap_auto", "gap"):
            row[f"speedup_{name}"] = row["dense_ms"] / row[f"{name}_ms"]
        for name in ("bitmap_auto", "gap"):
            row[f"{name}_over_fp8_proxy"] = row["fp8_proxy_ms"] / row[f"{name}_ms"]
        for name in ("dense", "gap", "bitmap"):
            ms = row[f"{name}_ms" if name != "bitmap" else "bitmap_auto_ms"]
            row[f"{name}_bw_frac"] = row[f"{name}_bytes"] / (ms * 1e-3) / bw
        rows.append(row)
        save()
        tqdm.write(f"{sh.name}: dense {row['dense_ms']:.4f} ms | fp8 proxy {row['speedup_fp8_proxy']:.2f}x | bitmap "
                   f"auto {row['speedup_bitmap_auto']:.2f}x ({row['bitmap_bw_frac'] * 100:.0f}% bw) | gap "
                   f"{row['speedup_gap']:.2f}x ({row['gap_bw_frac'] * 100:.0f}% bw, {row['gap_over_fp8_proxy']:.2f}x "
                   f"proxy, w{best} ns{row['gap_nsplit']}) | err gap {row['rel_err_gap']:.1e} bitmap "
                   f"{row['rel_err_bitmap_auto']:.1e}")
        del q, kd, vd, kc, kv, kp, vc, vv, vp, kb, kvals, vb, vvals, ksc, vsc, ksc_, vsc_
        torch.cuda.empty_cache()
    print(f"wrote {save()}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
