"""Decode-attention kernel benchmark on a CUDA GPU: dense SDPA vs the fused sparse kernel vs the
unfused sparse baseline (decode the bitmap to dense, then SDPA).

``python -m mustafar.bench.kernel [--quick] [--out results/kernel_h200.json]``
(``python -m mustafar.bench kernel`` where the package's ``__main__`` dispatches here.)

For every configuration (head_dim 128; MHA 32/32 and GQA 32/8; fp16 and bf16; B in {1, 8, 32};
T in {4K, 16K, 32K}; sparsity 0.5 and 0.7 for K and V) it times, as the median of many
repetitions after warm-up with ``triton.testing.do_bench`` (which flushes the L2 cache before each
repetition, so every call reads its inputs from HBM):

* ``dense``: ``torch.nn.functional.scaled_dot_product_attention`` with q ``[B, H, 1, D]`` and K/V
  ``[B, H_kv, T, D]`` (``enable_gqa`` for GQA);
* ``fused``: ``mustafar.ops.sparse_decode`` on the compressed cache (all T tokens compressed), with
  the kernel the op picks by default, and (fp16/bf16) each CUDA kernel forced with
  ``MUSTAFAR_CUDA_DECODE=v4`` / ``v5`` / ``v6`` (``fused_v4_ms`` ...; v6 only for 1 or 4 query heads per
  KV head with k <= 64),
  plus ``v6g`` (v6's run-time-k instantiation; it differs from ``v6`` where v6 has k compiled in:
  k = 38 and 64 at D = 128);
* ``unfused``: ``decode_bitmap`` of K and V, then the same SDPA;
* ``fused_nopdl``: the default kernel with its merge kernel launched after it rather than as a
  programmatic dependent (``MUSTAFAR_CUDA_PDL=0``).

and reports speed-ups over dense and the achieved bandwidth over the bytes actually read
(bitmaps + packed values + q + output) against a device-to-device copy bandwidth measured in the
same run. It also times the compression of 256 new tokens (``prune_encode_topk`` of K and V) against
one decode step. Results go to JSON with provenance (device, versions, commit, date, command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import torch

__all__ = ["main", "run"]


def _bench(fn, warmup_ms: float = 25.0, rep_ms: float = 150.0) -> float:
    """Median time of ``fn()`` in milliseconds."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except ImportError:  # pragma: no cover - CUDA events, flushing L2 with a 256 MB write
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        for _ in range(5):
            fn()
        times = []
        for _ in range(50):
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        times.sort()
        return times[len(times) // 2]


@contextlib.contextmanager
def env_set(name: str, value: str):
    """Set the environment variable ``name`` to ``value`` inside the block (the CUDA op reads
    ``MUSTAFAR_CUDA_DECODE`` / ``MUSTAFAR_CUDA_PDL`` at every call), then restore it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    ms = _bench(lambda: b.copy_(a))
    del a, b
    return 2 * n / (ms * 1e-3)


def provenance(argv: list[str], module: str = "mustafar.bench.kernel") -> dict:
    """:func:`mustafar.provenance.collect` plus the GPU's multiprocessor count."""
    from mustafar.provenance import collect

    prov = collect(command=f"python -m {module} " + " ".join(argv))
    prov["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    return prov


TARGET_POINTS = {(8, 16384), (32, 4096), (1, 32768)}


def _k_of(s: float, d: int) -> int:
    return d - int(math.floor(s * d + 0.5))


def run(quick: bool = False, heads=((32, 32), (32, 8)), dtypes=("float16", "bfloat16"), batches=(1, 8, 32),
        seqs=(4096, 16384, 32768), sparsities=(0.5, 0.7), d: int = 128, mem_budget_gib: float = 100.0,
        points=None, log=print) -> dict:
    from mustafar import ops

    assert ops.backend("cuda") == "cuda", f"CUDA kernels not available: backend={ops.backend('cuda')}"
    bw = copy_bandwidth()
    log(f"copy bandwidth: {bw / 1e12:.3f} TB/s")
    rows = []
    if quick:
        batches, seqs, dtypes = (1, 8), (4096, 16384), ("float16",)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for (h_q, h_kv) in heads:
        for dt_name in dtypes:
            dt = getattr(torch, dt_name)
            isz = torch.tensor([], dtype=dt).element_size()
            for b in batches:
                for t in seqs:
                    if points is not None and (b, t) not in points:
                        continue
                    dense_bytes = 2 * b * h_kv * t * d * isz
                    if dense_bytes * 2.2 > mem_budget_gib * (1 << 30):
                        log(f"skip B={b} T={t}: {dense_bytes / 2**30:.1f} GiB dense K+V over budget")
                        continue
                    q = torch.randn(b, h_q, d, device="cuda", generator=gen).to(dt)
                    kd = torch.randn(b, h_kv, t, d, device="cuda", generator=gen).to(dt)
                    vd = torch.randn(b, h_kv, t, d, device="cuda", generator=gen).to(dt)
                    q4 = q.unsqueeze(2)  # [B, H_q, 1, D]
                    gqa = h_q != h_kv
                    sdpa = torch.nn.functional.scaled_dot_product_attention

                    def dense_fn(kd=kd, vd=vd, q4=q4, gqa=gqa):
                        return sdpa(q4, kd, vd, enable_gqa=gqa) if gqa else sdpa(q4, kd, vd)

                    t_dense = _bench(dense_fn)
                    empty = q.new_empty(b, h_kv, 0, d)
                    for s in sparsities:
                        k = _k_of(s, d)
                        kb, kv = ops.prune_encode_topk(kd, k)
                        vb, vv = ops.prune_encode_topk(vd, k)
                        scale = 1.0 / math.sqrt(d)

                        def fused(kb=kb, kv=kv, vb=vb, vv=vv):
                            return torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, empty, empty, None, scale)

                        def unfused(kb=kb, kv=kv, vb=vb, vv=vv, gqa=gqa):
                            kk_ = torch.ops.mustafar.decode_bitmap(kb, kv, d)
                            vv_ = torch.ops.mustafar.decode_bitmap(vb, vv, d)
                            return sdpa(q4, kk_, vv_, enable_gqa=gqa) if gqa else sdpa(q4, kk_, vv_)

                        # correctness spot check against the unfused path (fp32 compare)
                        o_f = fused().float()
                        o_u = unfused().squeeze(2).float()
                        rel = float((o_f - o_u).norm() / o_u.norm())
                        t_fused = _bench(fused)
                        # the same with the merge kernel launched after the decode kernel instead of as its
                        # programmatic dependent (csrc/cuda/mustafar_cuda.cuh, launch_merge)
                        with env_set("MUSTAFAR_CUDA_PDL", "0"):
                            t_nopdl = _bench(fused)
                        # both kernels side by side (the op's default picks one per configuration)
                        t_k, rel_k = {}, {}
                        if dt != torch.float32:
                            kernels = ("v4", "v5", "v6", "v6g") if (h_q // h_kv in (1, 4) and k <= 64) else ("v4", "v5")
                            for kern in kernels:
                                with env_set("MUSTAFAR_CUDA_DECODE", kern):
                                    rel_k[kern] = float((fused().float() - o_u).norm() / o_u.norm())
                                    t_k[kern] = _bench(fused)
                        t_unf = _bench(unfused)
                        # compression of 256 new tokens (K and V) vs one decode step
                        kn = kd[:, :, :256]
                        vn = vd[:, :, :256]
                        t_comp = _bench(lambda kn=kn, vn=vn, k=k: (ops.prune_encode_topk(kn, k),
                                                                  ops.prune_encode_topk(vn, k)))
                        comp_bytes = (kb.numel() * 8 + kv.numel() * isz) * 2 + q.numel() * isz * 2
                        row = {
                            "H_q": h_q, "H_kv": h_kv, "D": d, "dtype": dt_name, "B": b, "T": t, "sparsity": s,
                            "k": k, "dense_ms": t_dense, "fused_ms": t_fused, "fused_nopdl_ms": t_nopdl,
                            "unfused_ms": t_unf,
                            "speedup_fused": t_dense / t_fused, "speedup_unfused": t_dense / t_unf,
                            "dense_bytes": dense_bytes, "fused_bytes": comp_bytes,
                            "bytes_ratio": comp_bytes / dense_bytes,
                            "dense_bw_frac": dense_bytes / (t_dense * 1e-3) / bw,
                            "fused_bw_frac": comp_bytes / (t_fused * 1e-3) / bw,
                            "fused_floor_ms": comp_bytes / bw * 1e3,
                            "compress_256_ms": t_comp, "compress_256_over_step": t_comp / t_fused,
                            "rel_err_vs_unfused": rel,
                        }
                        for kern in ("v4", "v5", "v6", "v6g"):  # None where a kernel does not cover the configuration
                            row[f"fused_{kern}_ms"] = t_k.get(kern)
                            row[f"speedup_fused_{kern}"] = (t_dense / t_k[kern]) if kern in t_k else None
                            row[f"fused_{kern}_bw_frac"] = (comp_bytes / (t_k[kern] * 1e-3) / bw) if kern in t_k else None
                            row[f"rel_err_{kern}_vs_unfused"] = rel_k.get(kern)
                        rows.append(row)
                        log(f"H{h_q}/{h_kv} {dt_name:8s} B={b:2d} T={t:6d} s={s:.1f}: dense {t_dense:.4f} ms  "
                            f"fused {t_fused:.4f} ms ({t_dense / t_fused:.2f}x, {row['fused_bw_frac'] * 100:.0f}% bw; no PDL {t_nopdl:.4f})  "
                            + ("[" + " / ".join(f"{n} {v:.4f}" for n, v in t_k.items()) + " ms]  " if t_k else "") +
                            f"unfused {t_unf:.4f} ms ({t_dense / t_unf:.2f}x)  comp256 {t_comp:.4f} ms  rel {rel:.1e}")
                        del kb, kv, vb, vv
                    del kd, vd
                    torch.cuda.empty_cache()
    return {"copy_bandwidth_Bps": bw, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m mustafar.bench.kernel", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    ap.add_argument("--targets", action="store_true",
                    help="only the (B, T) points of the speed targets: (8, 16K), (32, 4K), (1, 32K)")
    ap.add_argument("--out", default=os.path.join("results", "kernel_h200.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("mustafar.bench.kernel: needs a CUDA GPU", file=sys.stderr)
        return 2
    res = run(quick=args.quick, points=TARGET_POINTS if args.targets else None)
    res["provenance"] = provenance(argv)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    # short table last
    def x(r, kern):
        v = r.get(f"speedup_fused_{kern}")
        return f"{v:5.2f}" if v else "    -"

    print(f"{'heads':>7} {'dtype':>8} {'B':>3} {'T':>6} {'s':>4} {'dense':>8} {'fused':>8} {'x':>5} {'bw%':>4} "
          f"{'v4 x':>5} {'v5 x':>5} {'v6 x':>5} {'v6g x':>5} {'unfused x':>9}")
    for r in res["rows"]:
        print(f"{r['H_q']:>3}/{r['H_kv']:<3} {r['dtype']:>8} {r['B']:>3} {r['T']:>6} {r['sparsity']:>4} "
              f"{r['dense_ms']:8.4f} {r['fused_ms']:8.4f} {r['speedup_fused']:5.2f} {r['fused_bw_frac'] * 100:4.0f} "
              f"{x(r, 'v4')} {x(r, 'v5')} {x(r, 'v6')} {x(r, 'v6g')} {r['speedup_unfused']:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
