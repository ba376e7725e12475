"""Decode-attention kernel benchmark on a CUDA GPU: dense SDPA vs the fused sparse kernel vs the
unfused sparse baseline (decode the bitmap to dense, then SDPA).

``python -m mustafar.bench kernel [--quick] [--targets] [--out results/kernel_h200.json]``
(also ``python -m mustafar.bench.kernel``).

For every configuration (head_dim 128; MHA 32/32 and GQA 32/8; fp16 and bf16; B in {1, 8, 32};
T in {4K, 16K, 32K}; sparsity 0.5 and 0.7 for K and V) it times, as the median of many
repetitions after warm-up with ``triton.testing.do_bench`` (which flushes the L2 cache before each
repetition, so every call reads its inputs from HBM):

* ``dense``: ``torch.nn.functional.scaled_dot_product_attention`` with q ``[B, H, 1, D]`` and K/V
  ``[B, H_kv, T, D]`` (``enable_gqa`` for GQA);
* ``fused``: ``mustafar.ops.sparse_decode`` on the compressed cache (all T tokens compressed), with
  the kernel the op picks by default (``kernel="auto"``), and (fp16/bf16) each CUDA kernel chosen
  with ``kernel="v4"`` / ``"v5"`` / ``"v6"`` (``fused_v4_ms`` ...; v6 only for 1 or 4 query heads per
  KV head with k <= 64), plus ``"v6g"`` (v6's run-time-k instantiation; it differs from ``v6`` where
  v6 has k compiled in: k = 38 and 64 at D = 128);
* ``unfused``: ``decode_bitmap`` of K and V, then the same SDPA;
* ``fused_nopdl``: the default kernel with its merge kernel launched after it rather than as a
  programmatic dependent (``pdl=False``).

Every time is :func:`mustafar.bench.common.gpu_bench_ms`. It reports speed-ups over dense and the achieved bandwidth over the bytes actually read
(bitmaps + packed values + q + output) against a device-to-device copy bandwidth measured in the
same run. It also times the compression of 256 new tokens (``prune_encode_topk`` of K and V) against
one decode step. Results go to JSON with provenance (device, versions, commit, date, command).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from mustafar.bench.common import command_line, default_out, gpu_bench_ms, require_cuda, write_results

__all__ = ["KERNELS", "TARGET_POINTS", "copy_bandwidth", "kernels_for", "main", "run"]

#: the CUDA decode kernels ``mustafar.ops.sparse_decode(kernel=...)`` can be asked for
KERNELS = ("v4", "v5", "v6", "v6g")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    ms = gpu_bench_ms(lambda: b.copy_(a))
    del a, b
    return 2 * n / (ms * 1e-3)


TARGET_POINTS = {(8, 16384), (32, 4096), (1, 32768)}


def kernels_for(group: int, k: int) -> tuple[str, ...]:
    """The CUDA kernels that cover ``group`` query heads per KV head with ``k`` values per row
    (fp16/bf16): v6 and v6g need a group of 1 or 4 and k <= 64; v4 and v5 cover every configuration."""
    return KERNELS if (group in (1, 4) and k <= 64) else ("v4", "v5")


def run(quick: bool = False, heads=((32, 32), (32, 8)), dtypes=("float16", "bfloat16"), batches=(1, 8, 32),
        seqs=(4096, 16384, 32768), sparsities=(0.5, 0.7), d: int = 128, mem_budget_gib: float = 100.0,
        points=None, log=print) -> dict:
    """Time every configuration (see the module doc); ``points``: only these ``(B, T)``; ``quick``: B in
    {1, 8}, T in {4K, 16K}, fp16 only. A configuration whose dense K + V (x 2.2 for the compressed copy and
    the temporaries) exceeds ``mem_budget_gib`` is skipped.

    Returns
    -------
    dict
        ``copy_bandwidth_Bps`` and ``rows`` (one dict per heads x dtype x B x T x sparsity: times in ms,
        speed-ups over dense, bytes read, bandwidth fractions, relative errors vs the unfused path).
    """
    from mustafar import ops
    from mustafar.format import kept_count

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

                    t_dense = gpu_bench_ms(dense_fn)
                    empty = q.new_empty(b, h_kv, 0, d)
                    for s in sparsities:
                        k = kept_count(d, s)
                        kb, kv = ops.prune_encode_topk(kd, k)
                        vb, vv = ops.prune_encode_topk(vd, k)
                        scale = 1.0 / math.sqrt(d)

                        def fused(kb=kb, kv=kv, vb=vb, vv=vv, kernel="auto", pdl=True):
                            return ops.sparse_decode(q, kb, kv, vb, vv, empty, empty, None, scale,
                                                     kernel=kernel, pdl=pdl)

                        def unfused(kb=kb, kv=kv, vb=vb, vv=vv, gqa=gqa):
                            kk_ = ops.decode_bitmap(kb, kv, d)
                            vv_ = ops.decode_bitmap(vb, vv, d)
                            return sdpa(q4, kk_, vv_, enable_gqa=gqa) if gqa else sdpa(q4, kk_, vv_)

                        # correctness spot check against the unfused path (fp32 compare)
                        o_f = fused().float()
                        o_u = unfused().squeeze(2).float()
                        rel = float((o_f - o_u).norm() / o_u.norm())
                        t_fused = gpu_bench_ms(fused)
                        # the same with the merge kernel launched after the decode kernel instead of as its
                        # programmatic dependent
                        t_nopdl = gpu_bench_ms(lambda fused=fused: fused(pdl=False))
                        # the kernels side by side (the op's default picks one per configuration)
                        t_k, rel_k = {}, {}
                        if dt != torch.float32:
                            for kern in kernels_for(h_q // h_kv, k):
                                rel_k[kern] = float((fused(kernel=kern).float() - o_u).norm() / o_u.norm())
                                t_k[kern] = gpu_bench_ms(lambda fused=fused, kern=kern: fused(kernel=kern))
                        t_unf = gpu_bench_ms(unfused)
                        # compression of 256 new tokens (K and V) vs one decode step
                        kn = kd[:, :, :256]
                        vn = vd[:, :, :256]
                        t_comp = gpu_bench_ms(lambda kn=kn, vn=vn, k=k: (ops.prune_encode_topk(kn, k),
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
                        for kern in KERNELS:  # None where a kernel does not cover the configuration
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
    ap = argparse.ArgumentParser(prog="python -m mustafar.bench kernel", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    ap.add_argument("--targets", action="store_true",
                    help="only the (B, T) points of the speed targets: (8, 16K), (32, 4K), (1, 32K)")
    ap.add_argument("--out", default=None, help="output JSON (default results/kernel_h200.json)")
    args = ap.parse_args(argv)
    if not require_cuda("mustafar.bench kernel"):
        return 2
    res = run(quick=args.quick, points=TARGET_POINTS if args.targets else None)
    out = write_results(args.out or default_out("kernel_h200.json"), res, command_line("kernel", argv))
    print(f"wrote {out}")
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
