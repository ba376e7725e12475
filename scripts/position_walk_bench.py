#!/usr/bin/env python3
"""Time the position-walk prototypes (csrc/proto/position_walk.cu) on a GPU: the bitmap walk of v6 against 4-bit
gap codes with filler slots (``mustafar.gapcode``) and one channel byte per value, on the same rows, side by side
in one run (issue #15: "prototype at least two candidates as microbenchmarks in one device call").

Each kernel walks B x H x T rows (one warp per 32-row tile, lane = row) and scatters the values into a dense tile;
a first run also sums each row's column (and zeroes it) and is checked against the row sums computed in torch,
the timed runs do the walk and the scatter alone. Rows are
the same for the three codes: per-token masks with the k kept channels spread over the 32-bit words of the bitmap
(every word non-empty, as v6's fast path needs), random fp16 values, stored in word-major tiles (:func:`word_major`:
coalesced loads; the session-15 run, ``results/position_walk_h100.json``, read row-major rows and timed those
loads rather than the walks). Times: CUDA events, median of ``--reps`` after
warm-up, twice: rows from HBM (each tile its own rows) and from L2 (64K rows walked again and again, so the time is
the walk's issue rate, not the bytes); ``GBps_hbm`` counts the bytes each code reads (positions + values).

    python scripts/position_walk_bench.py [--rows 4194304] [--reps 30] [--out results/position_walk_<gpu>.json]

The prototype extension is built on first use (torch.utils.cpp_extension.load, ~1 min). CPU tests cover the
input builder (:func:`make_rows`, :func:`formats`, :func:`word_major`, :func:`expected`).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: (D, k): 70 % and 50 % at D = 128 and 64
CONFIGS = ((128, 38), (128, 64), (64, 19), (64, 32))
KINDS = ("bitmap", "gap", "index")
L2_TILES = 2048  # 64K rows, <= 7.5 MB in any of the codes: L2-resident on an H100 / H200 (50 MB)


def make_rows(n: int, d: int, k: int, seed: int = 0) -> torch.Tensor:
    """``[n, d]`` float16 rows with exactly ``k`` non-zeros, spread evenly over the 32-channel words (each word
    gets ``k // W`` or one more, at random channels), values uniform in +-[0.5, 1.5) (never zero)."""
    g = torch.Generator().manual_seed(seed)
    w = d // 32
    per = [k // w + (1 if i < k % w else 0) for i in range(w)]
    mask = torch.zeros(n, d, dtype=torch.bool)
    for i, c in enumerate(per):
        idx = torch.rand(n, 32, generator=g).argsort(dim=1)[:, :c] + 32 * i
        mask.scatter_(1, idx, True)
    mag = 0.5 + torch.rand(n, d, generator=g)
    sign = torch.where(torch.rand(n, d, generator=g) < 0.5, -1.0, 1.0)
    return torch.where(mask, mag * sign, torch.zeros(())).half()


def formats(x: torch.Tensor, k: int) -> dict:
    """The rows in each code: ``{kind: (positions as int32 words [n, *], values as int32 words [n, *], S)}``."""
    from mustafar import format as fmt
    from mustafar import gapcode

    n, d = x.shape
    kept = x != 0
    pos = torch.arange(d).expand(n, d)[kept].view(n, k)  # ascending

    def words16(v, s):  # fp16 values, s per row, padded to an even count
        v = torch.cat([v, v.new_zeros(n, s % 2)], dim=1) if s % 2 else v
        return v.contiguous().view(torch.int32)

    # the bitmap format's int64 words read as 32-bit halves: bit j of word i <=> channel 32 i + j
    sp = fmt.encode(x, kept, k)
    bitmap, vals = sp.bitmap.contiguous().view(torch.int32), sp.values
    g = gapcode.encode(x, k)
    s = g.values.shape[1]
    idx = torch.cat([pos, pos.new_zeros(n, (-k) % 4)], dim=1).to(torch.uint8).view(torch.int32)
    return {"bitmap": (bitmap, words16(vals, k), k), "gap": (g.codes.view(torch.int32), words16(g.values, s), s),
            "index": (idx, words16(vals, k), k)}


def word_major(words: torch.Tensor) -> torch.Tensor:
    """Per-row int32 words ``[n, W]`` (``n`` a multiple of 32) as the walks read them: tile by tile (32 rows), word
    ``i`` of the tile's rows side by side (``[n // 32, W, 32]``, flattened), so that a warp's load is coalesced."""
    n, w = words.shape
    return words.view(n // 32, 32, w).transpose(1, 2).contiguous().view(-1)


def expected(x: torch.Tensor, blocks: int, threads: int) -> torch.Tensor:
    """What each thread of a walk kernel returns: the sum of the float16 row sums of the tiles it walks (tile t
    is walked by warp t mod (blocks * threads / 32), lane = row t * 32 + lane)."""
    n = x.shape[0]
    ntiles = n // 32
    warps = blocks * threads // 32
    rs = x.float().sum(dim=1).view(ntiles, 32)
    out = torch.zeros(warps, 32)
    out.index_add_(0, torch.arange(ntiles) % warps, rs)
    return out.view(-1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1 << 22, help="rows per configuration (B x H x T), a multiple of 32")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.utils.cpp_extension import load

    from mustafar.bench.common import default_out, gpu_slug, write_results

    ext = load(name="mustafar_proto_walk", sources=[os.path.join(ROOT, "csrc", "proto", "position_walk_ext.cu")],
               extra_cuda_cflags=["-O3", "-gencode=arch=compute_90a,code=sm_90a"], verbose=False)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    threads = 256
    rows = []
    for d, k in CONFIGS:
        x = make_rows(args.rows, d, k)
        blocks = sms * max(1, (227 * 1024) // ((threads // 32) * (d + 1) * 80))
        ref = expected(x, blocks, threads).cuda()
        res = {}
        nt = args.rows // 32
        for kind, (pos, vals, s) in formats(x, k).items():
            nbytes = pos.numel() * 4 + vals.numel() * 4
            pos, vals = word_major(pos).cuda(), word_major(vals).cuda()
            out = torch.full((blocks * threads,), float("nan"), device="cuda")
            ext.walk(kind, d, s, pos, vals, out, nt, nt, blocks, threads, 1)  # checked run
            torch.cuda.synchronize()
            err = float((out - ref).abs().max() / ref.abs().max())
            res[kind] = dict(slots=s, rel_err=err, bytes=nbytes)
            # the walk and the scatter alone: rows from HBM (every tile its own rows), and from L2 (the first
            # L2_TILES tiles' rows again and again: the issue-bound rate)
            for mode, td in (("hbm", nt), ("l2", min(L2_TILES, nt))):
                ts = []
                for i in range(args.reps + 5):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    ext.walk(kind, d, s, pos, vals, out, nt, td, blocks, threads, 0)
                    b.record()
                    b.synchronize()
                    if i >= 5:
                        ts.append(a.elapsed_time(b))
                res[kind][f"ms_{mode}"] = sorted(ts)[len(ts) // 2]
            res[kind]["GBps_hbm"] = nbytes / res[kind]["ms_hbm"] / 1e6
            print(f"D={d} k={k} {kind:6s} S={s}: HBM {res[kind]['ms_hbm']:.4f} ms ({res[kind]['GBps_hbm']:.0f} GB/s), "
                  f"L2 {res[kind]['ms_l2']:.4f} ms, rel err {err:.1e}")
        for kind in KINDS:
            for mode in ("hbm", "l2"):
                res[kind][f"speedup_{mode}_over_bitmap"] = res["bitmap"][f"ms_{mode}"] / res[kind][f"ms_{mode}"]
        rows.append(dict(D=d, k=k, rows=args.rows, blocks=blocks, threads=threads, **res))
    cmd = "python scripts/position_walk_bench.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    path = write_results(args.out or default_out(f"position_walk_{gpu_slug()}.json"), {"rows": rows}, cmd)
    print(f"wrote {path}")
    return 0 if all(r[kind]["rel_err"] < 1e-3 for r in rows for kind in KINDS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
