"""Fixed costs of one fused decode call on the GPU, next to dense SDPA (MHA 32/32, D=128, fp16).

``python -m mustafar.bench overhead [--s 0.7] [--out results/decode_overhead_h200.json]``
(was ``scripts/gpu_overhead.py``)

1. Fixed cost: batch 1, T from 2K to 64K, times as in ``python -m mustafar.bench kernel``
   (:func:`mustafar.bench.common.gpu_bench_ms`: median of ``triton.testing.do_bench`` with an L2
   flush), a least-squares line t = a + b T per path: ``a`` is the cost that does not grow with the
   cache (launches, pipeline fill, the merge), ``b`` the time per token. Paths: dense SDPA, the fused
   decode with its merge kernel launched as a programmatic dependent (default, ``pdl=True``) and
   launched after it (``pdl=False``).
2. Kernels: ``torch.profiler`` device time of each kernel of one call (decode, merge; dense's own
   kernels) at the target points B=1, T=32K and B=8, T=16K. The merge is launched as a programmatic
   dependent of the decode kernel, so its recorded duration includes its wait for the decode grid:
   read it as "merge end minus decode start", not as the merge's own work.
3. Host time per call: wall-clock time of 300 calls on a tiny cache (the GPU idles, so the host is
   what is measured), fused (``mustafar.ops.sparse_decode``) vs dense.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from mustafar.bench.common import (affine_fit, command_line, default_out, gpu_bench_ms, provenance, require_cuda,
                                   timed_call, write_results)

__all__ = ["BATCH1_CONTEXTS", "fit", "kernel_times", "main", "run"]

H, D = 32, 128
DT = torch.float16
BATCH1_CONTEXTS = (2048, 4096, 8192, 16384, 32768, 65536)
KERNEL_POINTS = ((1, 32768), (8, 16384))
HOST_CALLS, HOST_WARMUP = 300, 20


def _inputs(b: int, t: int, s: float, gen):
    """``(fused(pdl=True), dense())`` closures over random q ``[b, H, D]`` and K/V ``[b, H, t, D]``
    (fp16, CUDA), K and V compressed at sparsity ``s``."""
    from mustafar import ops
    from mustafar.format import kept_count

    k = kept_count(D, s)
    q = torch.randn(b, H, D, device="cuda", generator=gen).to(DT)
    kd = torch.randn(b, H, t, D, device="cuda", generator=gen).to(DT)
    vd = torch.randn(b, H, t, D, device="cuda", generator=gen).to(DT)
    kb, kv = ops.prune_encode_topk(kd, k)
    vb, vv = ops.prune_encode_topk(vd, k)
    empty = q.new_empty(b, H, 0, D)
    scale = 1.0 / math.sqrt(D)

    def fused(pdl: bool = True):
        return ops.sparse_decode(q, kb, kv, vb, vv, empty, empty, None, scale, pdl=pdl)

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), kd, vd)

    return fused, dense


def fit(ts, ms) -> dict:
    """Least-squares line ``ms = a + b T`` (:func:`mustafar.bench.common.affine_fit`).

    Parameters
    ----------
    ts : context lengths; ms : milliseconds at each

    Returns
    -------
    dict
        ``fixed_us`` (``a``), ``per_1k_tokens_us`` (``b`` per 1000 tokens) and ``max_residual_us``.
    """
    icpt, slope = affine_fit(list(ts), list(ms))
    resid = max(abs(m - (icpt + slope * t)) for t, m in zip(ts, ms))
    return {"fixed_us": icpt * 1e3, "per_1k_tokens_us": slope * 1e6, "max_residual_us": resid * 1e3}


def kernel_times(fn, reps: int = 20) -> dict:
    """Average device time (us) of each kernel ``fn()`` launches, over ``reps`` calls under
    ``torch.profiler`` after 3 warm-up calls: ``{kernel name[:90]: {"count", "avg_us"}}``."""
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


def _host_us_per_call(fn) -> float:
    """Wall-clock microseconds per call over :data:`HOST_CALLS` back-to-back calls (after
    :data:`HOST_WARMUP`): on a tiny cache the GPU idles, so this is the host's cost of one call."""
    for _ in range(HOST_WARMUP):
        fn()

    def calls():
        for _ in range(HOST_CALLS):
            fn()

    _, sec = timed_call(calls, "cuda")
    return sec / HOST_CALLS * 1e6


def run(s: float = 0.7, log=print) -> dict:
    """The three measurements of the module doc at sparsity ``s``.

    Returns
    -------
    dict
        ``batch1_rows`` (per T: ``dense_ms``, ``fused_ms``, ``fused_nopdl_ms``), ``batch1_fit`` (per
        path: :func:`fit`), ``kernels`` (per target point, fused and dense: :func:`kernel_times`) and
        ``host`` (``fused_us_per_call``, ``dense_us_per_call``), plus the settings.
    """
    gen = torch.Generator(device="cuda").manual_seed(0)
    res: dict = {"sparsity": s, "H": H, "D": D, "dtype": str(DT).replace("torch.", "")}
    rows = []
    for t in BATCH1_CONTEXTS:
        fused, dense = _inputs(1, t, s, gen)
        row = {"T": t, "dense_ms": gpu_bench_ms(dense), "fused_ms": gpu_bench_ms(fused),
               "fused_nopdl_ms": gpu_bench_ms(lambda fused=fused: fused(pdl=False))}
        rows.append(row)
        log(f"B=1 T={t:6d}: dense {row['dense_ms']:.4f}  fused {row['fused_ms']:.4f}  "
            f"no-PDL {row['fused_nopdl_ms']:.4f} ms")
        del fused, dense
        torch.cuda.empty_cache()
    res["batch1_rows"] = rows
    res["batch1_fit"] = {k: fit(BATCH1_CONTEXTS, [r[k] for r in rows]) for k in ("dense_ms", "fused_ms", "fused_nopdl_ms")}
    for k, f in res["batch1_fit"].items():
        log(f"fit {k}: fixed {f['fixed_us']:.1f} us, {f['per_1k_tokens_us']:.3f} us per 1K tokens "
            f"(max residual {f['max_residual_us']:.1f} us)")

    res["kernels"] = {}
    for b, t in KERNEL_POINTS:
        fused, dense = _inputs(b, t, s, gen)
        res["kernels"][f"B{b}_T{t}"] = {"fused": kernel_times(fused), "dense": kernel_times(dense)}
        log(f"B={b} T={t} kernels:", json.dumps(res["kernels"][f"B{b}_T{t}"], indent=1))
        del fused, dense
        torch.cuda.empty_cache()

    fused, dense = _inputs(1, 256, s, gen)
    res["host"] = {f"{name}_us_per_call": _host_us_per_call(fn) for name, fn in (("fused", fused), ("dense", dense))}
    log("host time per call:", res["host"])
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m mustafar.bench overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output JSON (default results/decode_overhead_h200.json)")
    ap.add_argument("--s", type=float, default=0.7, help="K and V sparsity (default 0.7)")
    args = ap.parse_args(argv)
    if not require_cuda("mustafar.bench overhead"):
        return 2
    prov = provenance(command_line("overhead", argv))  # before the run, as the script recorded it

    def log(*a):
        print(*a, flush=True)

    res = run(args.s, log=log)
    out = write_results(args.out or default_out("decode_overhead_h200.json"), res, prov=prov)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
