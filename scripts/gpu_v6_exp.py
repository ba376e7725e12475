"""Experiment driver (v6 development): dense SDPA vs the fused kernels at the speed-target points.

    python3 scripts/gpu_v6_exp.py [kernels...]     (default: v4 v6)

Times with triton's do_bench (median, L2 flushed), fp16 MHA 32/32, D=128, random data pruned per token.
"""
import math
import os
import sys

import torch
from triton.testing import do_bench

from mustafar._build import load_extension

load_extension()
kernels = sys.argv[1:] or ["v4", "v6"]
g = torch.Generator(device="cuda").manual_seed(0)
sdpa = torch.nn.functional.scaled_dot_product_attention
print(f"{'dtype':>8} {'B':>3} {'T':>6} {'s':>4} {'dense':>8} " + " ".join(f"{k:>13}" for k in kernels))
for dt, b, t, s in [(torch.float16, 8, 16384, 0.7), (torch.float16, 32, 4096, 0.7), (torch.float16, 1, 32768, 0.7),
                    (torch.float16, 8, 16384, 0.5), (torch.bfloat16, 8, 16384, 0.7), (torch.float16, 8, 4096, 0.7)]:
    d, h = 128, 32
    q = torch.randn(b, h, d, device="cuda", generator=g).to(dt)
    kd = torch.randn(b, h, t, d, device="cuda", generator=g).to(dt)
    vd = torch.randn(b, h, t, d, device="cuda", generator=g).to(dt)
    k = d - int(math.floor(s * d + 0.5))
    kb, kv = torch.ops.mustafar.prune_encode_topk(kd, k)
    vb, vv = torch.ops.mustafar.prune_encode_topk(vd, k)
    e = q.new_empty(b, h, 0, d)
    ref = sdpa(q.unsqueeze(2), torch.ops.mustafar.decode_bitmap(kb, kv, d),
               torch.ops.mustafar.decode_bitmap(vb, vv, d)).squeeze(2).float()
    td = do_bench(lambda: sdpa(q.unsqueeze(2), kd, vd), warmup=25, rep=150, return_mode="median")
    cells = []
    for kern in kernels:
        os.environ["MUSTAFAR_CUDA_DECODE"] = kern
        f = lambda: torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, e, e, None, 1 / math.sqrt(d))
        rel = float((f().float() - ref).norm() / ref.norm())
        tk = do_bench(f, warmup=25, rep=150, return_mode="median")
        cells.append(f"{tk:.4f} {td / tk:4.2f}x" + ("" if rel < 1e-2 else f" BAD{rel:.0e}"))
    os.environ.pop("MUSTAFAR_CUDA_DECODE", None)
    print(f"{str(dt)[6:]:>8} {b:>3} {t:>6} {s:>4} {td:8.4f} " + " ".join(f"{c:>13}" for c in cells))
    del kd, vd, kb, kv, vb, vv
    torch.cuda.empty_cache()
