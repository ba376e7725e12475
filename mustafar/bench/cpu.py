"""CPU benchmark: the compiled encoder and sparse decode attention against dense torch attention.

Both sides run in one process on the same inputs' shapes, timed as the median of many repetitions
after warm-up (:func:`mustafar.bench.common.time_ms`: ``time.perf_counter`` on the CPU):

* **encode**: ``mustafar.ops.prune_encode_topk`` (fused per-token top-k + bitmap encoding) on a
  ``[B, H_kv, T, D]`` K tensor, vs the plain-torch reference encoder (``mustafar.ops.reference``).
* **decode**: ``mustafar.ops.sparse_decode`` (one query token, compressed K and V, no window) vs
  ``torch.nn.functional.scaled_dot_product_attention`` on dense K/V of the same shape (GQA as
  ``q [B, H_kv, G, D]`` against ``K [B, H_kv, T, D]``: no K/V expansion, dense's best case).

Shapes: SmolLM2-135M-like (B=1, H_kv=3, G=3, D=64, T = 1K..8K) and a 7B-like layer (H=32, D=128,
T=4K). Writes ``results/cpu_bench.json`` with provenance.

    python -m mustafar.bench cpu [--quick] [--reps N] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mustafar import ops
from mustafar.bench.common import command_line, default_out, loadavg, set_threads, time_ms, write_results
from mustafar.format import kept_count
from mustafar.ops import reference as ref

__all__ = ["run", "main", "SHAPES"]

# (label, B, H_kv, G, D, T)
SHAPES = [
    ("smollm2", 1, 3, 3, 64, 1024),
    ("smollm2", 1, 3, 3, 64, 2048),
    ("smollm2", 1, 3, 3, 64, 4096),
    ("smollm2", 1, 3, 3, 64, 8192),
    ("7b", 1, 32, 1, 128, 4096),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[4]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(shapes=SHAPES, dtypes=("float32", "bfloat16"), sparsities=(0.5, 0.7), reps: int = 30,
        encode_reps: int = 5) -> dict:
    """Time encode and decode for every shape x dtype x sparsity.

    Parameters
    ----------
    shapes : list of ``(label, B, H_kv, G, D, T)``
        q is ``[B, H_kv * G, D]``, K and V ``[B, H_kv, T, D]``.
    dtypes : names in :data:`DTYPES`
    sparsities : K and V sparsities
    reps, encode_reps : int
        Timed repetitions of the decode calls and of the encoders (the reference encoder gets half).

    Returns
    -------
    dict with ``rows``: one dict per (shape, dtype, sparsity) holding ``dense_ms`` (SDPA),
    ``sparse_ms`` (ops.sparse_decode), ``speedup`` (dense/sparse), ``encode_ms``,
    ``encode_ref_ms``, byte counts and the backend used.
    """
    rows = []
    gen = torch.Generator().manual_seed(0)
    combos = [(s, dt, sp) for s in shapes for dt in dtypes for sp in sparsities]
    for (label, b, h_kv, g, d, t), dt_name, sparsity in tqdm(combos, desc="cpu bench", leave=False):
        dt = DTYPES[dt_name]
        q = torch.randn(b, h_kv * g, d, generator=gen).to(dt)
        k_dense = torch.randn(b, h_kv, t, d, generator=gen).to(dt)
        v_dense = torch.randn(b, h_kv, t, d, generator=gen).to(dt)
        k = kept_count(d, sparsity)
        kb, kv = ops.prune_encode_topk(k_dense, k)
        vb, vv = ops.prune_encode_topk(v_dense, k)
        qg = q.reshape(b, h_kv, g, d)  # [B, H_kv, G, D]: GQA without expanding K/V

        dense_ms = time_ms(lambda: F.scaled_dot_product_attention(qg, k_dense, v_dense), reps)
        sparse_ms = time_ms(lambda: ops.sparse_decode(q, kb, kv, vb, vv), reps)
        encode_ms = time_ms(lambda: ops.prune_encode_topk(k_dense, k), encode_reps, warmup=1)
        encode_ref_ms = time_ms(lambda: ref.prune_encode_topk(k_dense, k), max(1, encode_reps // 2), warmup=1)
        # accuracy of this very run (vs the float64 reference on the same compressed data)
        out = ops.sparse_decode(q, kb, kv, vb, vv)
        want = ref.sparse_decode(q.double(), kb, kv.double(), vb, vv.double(),
                                 k_dense[:, :, :0].double(), v_dense[:, :, :0].double())
        itemsize = k_dense.element_size()
        rows.append({
            "shape": label, "B": b, "H_kv": h_kv, "G": g, "D": d, "T": t, "dtype": dt_name,
            "sparsity": sparsity, "k": k,
            "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
            "encode_ms": encode_ms, "encode_ref_ms": encode_ref_ms,
            "encode_Mtok_per_s": b * h_kv * t / encode_ms / 1e3,
            "dense_kv_bytes": 2 * b * h_kv * t * d * itemsize,
            "sparse_kv_bytes": 2 * b * h_kv * t * (8 * (d // 64) + k * itemsize),
            "max_abs_err": float((out.double() - want).abs().max()),
            "backend": ops.backend("cpu"),
        })
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m mustafar.bench cpu", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 shapes, float32 only, fewer repetitions")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per point (default 30, quick 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--dtypes", default=None, help="comma list of float32,bfloat16,float16")
    ap.add_argument("--out", default=None, help="output JSON (default results/cpu_bench.json)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else (("float32",) if args.quick else ("float32", "bfloat16"))
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError(f"dtype {dt!r} not in {sorted(DTYPES)}")
    reps = args.reps or (10 if args.quick else 30)
    load_before = loadavg()
    res = run(shapes=QUICK_SHAPES if args.quick else SHAPES, dtypes=dtypes, reps=reps,
              encode_reps=2 if args.quick else 5)
    res["settings"] = {"reps": reps, "threads": torch.get_num_threads(), "timer": "median of perf_counter",
                       "loadavg_before": load_before,
                       "loadavg_after": loadavg(),
                       "dense_baseline": "F.scaled_dot_product_attention(q[B,H_kv,G,D], K, V) on dense K/V"}
    out = write_results(args.out or default_out("cpu_bench.json"), res, command_line("cpu", argv))
    print(f"{'shape':>8} {'T':>5} {'dtype':>8} {'s':>4} {'dense ms':>9} {'sparse ms':>9} {'x':>6} "
          f"{'enc ms':>8} {'enc ref ms':>10} {'bytes':>6}")
    for r in res["rows"]:
        print(f"{r['shape']:>8} {r['T']:>5} {r['dtype']:>8} {r['sparsity']:>4} {r['dense_ms']:>9.3f} "
              f"{r['sparse_ms']:>9.3f} {r['speedup']:>5.2f}x {r['encode_ms']:>8.2f} {r['encode_ref_ms']:>10.2f} "
              f"{r['sparse_kv_bytes'] / r['dense_kv_bytes']:>6.3f}")
    print(f"wrote {out} (threads={torch.get_num_threads()}, loadavg {load_before})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
