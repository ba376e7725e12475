"""Fixed costs of one fused decode call on the GPU, next to dense SDPA (MHA 32/32, D=128, fp16).

    MUSTAFAR_GIT_COMMIT=<hash> python3 scripts/gpu_overhead.py [--out results/decode_overhead_h200.json]

1. Fixed cost: batch 1, T from 2K to 64K, times as in ``python -m mustafar.bench.kernel`` (median of
   ``triton.testing.do_bench`` with an L2 flush), a least-squares line t = a + b T per path: ``a`` is
   the cost that does not grow with the cache (launches, pipeline fill, the merge), ``b`` the time per
   token. Paths: dense SDPA, the fused decode with its merge kernel launched as a programmatic
   dependent (default) and launched after it (``MUSTAFAR_CUDA_PDL=0``).
2. Kernels: ``torch.profiler`` device time of each kernel of one call (decode, merge; dense's own
   kernels) at the target points B=1, T=32K and B=8, T=16K. The merge is launched as a programmatic
   dependent of the decode kernel, so its recorded duration includes its wait for the decode grid:
   read it as "merge end minus decode start", not as the merge's own work.
3. Host time per call: wall-clock time of 300 calls on a tiny cache (the GPU idles, so the host is
   what is measured), fused vs dense.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mustafar.ops.build import load_extension  # noqa: E402
from mustafar.bench.kernel import _bench, env_set, provenance  # noqa: E402

H, D = 32, 128
DT = torch.float16


def _inputs(b: int, t: int, s: float, gen):
    k = D - int(math.floor(s * D + 0.5))
    q = torch.randn(b, H, D, device="cuda", generator=gen).to(DT)
    kd = torch.randn(b, H, t, D, device="cuda", generator=gen).to(DT)
    vd = torch.randn(b, H, t, D, device="cuda", generator=gen).to(DT)
    kb, kv = torch.ops.mustafar.prune_encode_topk(kd, k)
    vb, vv = torch.ops.mustafar.prune_encode_topk(vd, k)
    empty = q.new_empty(b, H, 0, D)
    scale = 1.0 / math.sqrt(D)

    def fused():
        return torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, empty, empty, None, scale)

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), kd, vd)

    return fused, dense


def _with_env(name: str, value: str, fn):
    def run():
        with env_set(name, value):
            return fn()
    return run


def _fit(ts: list[int], ms: list[float]) -> dict:
    n = len(ts)
    mt, mm = sum(ts) / n, sum(ms) / n
    slope = sum((t - mt) * (m - mm) for t, m in zip(ts, ms)) / sum((t - mt) ** 2 for t in ts)
    icpt = mm - slope * mt
    resid = max(abs(m - (icpt + slope * t)) for t, m in zip(ts, ms))
    return {"fixed_us": icpt * 1e3, "per_1k_tokens_us": slope * 1e6, "max_residual_us": resid * 1e3}


def _kernel_times(fn, reps: int = 20) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        dev = getattr(e, "device_time", None)
        if dev is None:
            dev = getattr(e, "cuda_time", 0.0)
        if e.count and dev:
            out[e.key[:90]] = {"count": e.count, "avg_us": float(dev)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("results", "decode_overhead_h200.json"))
    ap.add_argument("--s", type=float, default=0.7)
    args = ap.parse_args()
    load_extension()
    gen = torch.Generator(device="cuda").manual_seed(0)
    res: dict = {"provenance": provenance(sys.argv[1:], module="scripts/gpu_overhead.py"), "sparsity": args.s,
                 "H": H, "D": D, "dtype": "float16"}

    ts = [2048, 4096, 8192, 16384, 32768, 65536]
    rows = []
    for t in ts:
        fused, dense = _inputs(1, t, args.s, gen)
        row = {"T": t, "dense_ms": _bench(dense), "fused_ms": _bench(fused),
               "fused_nopdl_ms": _bench(_with_env("MUSTAFAR_CUDA_PDL", "0", fused))}
        rows.append(row)
        print(f"B=1 T={t:6d}: dense {row['dense_ms']:.4f}  fused {row['fused_ms']:.4f}  "
              f"no-PDL {row['fused_nopdl_ms']:.4f} ms", flush=True)
        del fused, dense
        torch.cuda.empty_cache()
    res["batch1_rows"] = rows
    res["batch1_fit"] = {k: _fit(ts, [r[k] for r in rows]) for k in ("dense_ms", "fused_ms", "fused_nopdl_ms")}
    for k, f in res["batch1_fit"].items():
        print(f"fit {k}: fixed {f['fixed_us']:.1f} us, {f['per_1k_tokens_us']:.3f} us per 1K tokens "
              f"(max residual {f['max_residual_us']:.1f} us)")

    res["kernels"] = {}
    for b, t in ((1, 32768), (8, 16384)):
        fused, dense = _inputs(b, t, args.s, gen)
        res["kernels"][f"B{b}_T{t}"] = {"fused": _kernel_times(fused), "dense": _kernel_times(dense)}
        print(f"B={b} T={t} kernels:", json.dumps(res["kernels"][f"B{b}_T{t}"], indent=1))
        del fused, dense
        torch.cuda.empty_cache()

    fused, dense = _inputs(1, 256, args.s, gen)
    host = {}
    for name, fn in (("fused", fused), ("dense", dense)):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(300):
            fn()
        torch.cuda.synchronize()
        host[name + "_us_per_call"] = (time.perf_counter() - t0) / 300 * 1e6
    res["host"] = host
    print("host time per call:", host)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
