"""Driver for Nsight Compute: the fused decode on one benchmark configuration.

    ncu --clock-control none -k regex:sd_rows_kernel --launch-skip 2 --launch-count 1 --set full \
        python3 scripts/gpu_profile.py [--B 8 --T 16384 --H 32 --Hkv 32 --s 0.7 --dtype float16 --kernel auto]

Runs ``torch.ops.mustafar.sparse_decode`` four times on random inputs compressed with
``prune_encode_topk`` (the same inputs as ``python -m mustafar.bench.kernel``), with the op's ``kernel``
(``auto``, ``v4``, ``v5``, ``v6``, ``v6g``, ``v7``, ``v7g``; ncu's ``-k`` regex:
``sparse_decode_kernel`` = v4, ``sd_scatter_kernel`` = v5, ``sd_rows_kernel`` = v6, ``regex:^decode_kernel`` = v7) and ``pdl`` (``--no-pdl``: the merge after the decode kernel).
"""
import argparse
import math

import torch

from mustafar.ops.build import load_extension

ap = argparse.ArgumentParser()
ap.add_argument("--B", type=int, default=8)
ap.add_argument("--T", type=int, default=16384)
ap.add_argument("--H", type=int, default=32)
ap.add_argument("--Hkv", type=int, default=32)
ap.add_argument("--D", type=int, default=128)
ap.add_argument("--s", type=float, default=0.7)
ap.add_argument("--dtype", default="float16")
ap.add_argument("--kernel", default="auto", choices=("auto", "v4", "v5", "v6", "v6g", "v7", "v7g"))
ap.add_argument("--no-pdl", action="store_true", help="launch the merge after the decode kernel")
a = ap.parse_args()
load_extension()
dt = getattr(torch, a.dtype)
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(a.B, a.H, a.D, device="cuda", generator=g).to(dt)
k = a.D - int(math.floor(a.s * a.D + 0.5))
kb, kv = torch.ops.mustafar.prune_encode_topk(torch.randn(a.B, a.Hkv, a.T, a.D, device="cuda", generator=g).to(dt), k)
vb, vv = torch.ops.mustafar.prune_encode_topk(torch.randn(a.B, a.Hkv, a.T, a.D, device="cuda", generator=g).to(dt), k)
empty = q.new_empty(a.B, a.Hkv, 0, a.D)
for _ in range(4):
    out = torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, empty, empty, None, 1 / math.sqrt(a.D), None, None, None, a.kernel,
                                           not a.no_pdl)
torch.cuda.synchronize()
print("ok", a, float(out.float().abs().sum()))
