"""Tiny driver for compute-sanitizer (memcheck / racecheck): every CUDA op once on small inputs (every decode kernel
with and without device lengths, FP8 values, v6 at 1 / 4 / 8 query-head slots, append_decode).
``python scripts/gpu_sanitize.py [KERNEL ...]``: only those decode kernels (e.g. ``v6k``; then no FP8 "auto" call and
no append_decode), so that racecheck, ~50x slower than the ops, reaches the 8-slot instantiations in a short call."""
import math
import sys

import torch

from mustafar.ops.build import load_extension

load_extension()
torch.manual_seed(0)
KNOWN = {"v4", "v5", "v6", "v6g", "v6k", "v7", "v7g"}
ONLY = set(sys.argv[1:])
if ONLY - KNOWN:
    sys.exit(f"gpu_sanitize.py: unknown kernel(s) {sorted(ONLY - KNOWN)}; expected some of {sorted(KNOWN)}")


def pick(kernels):
    return tuple(k for k in kernels if not ONLY or k in ONLY)


for dt in (torch.float16, torch.bfloat16):
    for d, g in ((128, 1), (64, 4), (128, 4)):
        b, h_kv, t_c, t_w = 2, 2, 150, 7
        x = torch.randn(b, h_kv, t_c, d, device="cuda", dtype=dt)
        kb, kv = torch.ops.mustafar.prune_encode_topk(x, d - round(0.7 * d))
        # d = 128: V with K's k (38: the instantiations with k compiled in), else k = d / 2
        vb, vv = torch.ops.mustafar.prune_encode_topk(torch.randn_like(x), d - round(0.7 * d) if d == 128 else d // 2)
        mask = torch.rand(x.shape, device="cuda") < 0.3
        eb, ev = torch.ops.mustafar.encode_bitmap(x, mask, int(mask.sum(-1).max()))
        dense = torch.ops.mustafar.decode_bitmap(eb, ev, d)
        q = torch.randn(b, h_kv * g, d, device="cuda", dtype=dt)
        kw = torch.randn(b, h_kv, t_w, d, device="cuda", dtype=dt)
        vw = torch.randn(b, h_kv, t_w, d, device="cuda", dtype=dt)
        ks = torch.tensor([0, 33], dtype=torch.int32, device="cuda")
        # every decode kernel on complete top-k rows and on arbitrary masks (v6 covers G = 1 and 4; v6g is
        # its run-time-k instantiation)
        # (the op's kernel argument); the merge as a programmatic dependent and after the decode kernel (pdl)
        for kern in pick(("v4", "v5", "v6", "v6g", "v6k")):
            for pdl in (True, False):
                out = torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, kw, vw, ks, 1 / math.sqrt(d), None, None, None, kern, pdl)
                out2 = torch.ops.mustafar.sparse_decode(q, eb, ev, vb, vv, kw, vw, ks, 1 / math.sqrt(d), None, None, None, kern, pdl)
                torch.cuda.synchronize()
                print(dt, d, g, kern, f"pdl={pdl}", "ok", float(out.float().abs().sum()),
                      float(out2.float().abs().sum()), float(dense.float().abs().sum()))

# v6 at every G <= 8 (1, 4 or 8 query-head slots) and v7 (any G, D 64 / 128 / 256, FP8 values), with device lengths
# over a ring window (the compileable cache's call: lengths below the capacities) and without; then append_decode
from mustafar import ops  # noqa: E402
from mustafar.ops import reference  # noqa: E402

for dt in (torch.float16, torch.bfloat16):
    for d, g in ((128, 1), (128, 3), (64, 8), (128, 7), (256, 2)):
        b, h_kv, cap, ring = 2, 2, 150, 24
        k = d - round(0.7 * d)
        kb, kv = torch.ops.mustafar.prune_encode_topk(torch.randn(b, h_kv, cap, d, device="cuda", dtype=dt), k)
        vb, vv = torch.ops.mustafar.prune_encode_topk(torch.randn(b, h_kv, cap, d, device="cuda", dtype=dt), k)
        k8, ksc = reference.quantize_fp8(kv)
        v8, vsc = reference.quantize_fp8(vv)
        q = torch.randn(b, h_kv * g, d, device="cuda", dtype=dt)
        kw = torch.randn(b, h_kv, ring, d, device="cuda", dtype=dt)
        vw = torch.randn(b, h_kv, ring, d, device="cuda", dtype=dt)
        ks = torch.tensor([0, 33], dtype=torch.int32, device="cuda")
        ln = torch.tensor([cap - 37, ring - 5], dtype=torch.int32, device="cuda")
        kerns = pick(("v7", "v7g") + (("v6", "v6g", "v6k") if d != 256 else ()))
        for kern in kerns:
            for lengths in (None, ln):
                out = torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, kw, vw, ks, 1 / math.sqrt(d), None, None,
                                                       lengths, kern, True)
                torch.cuda.synchronize()
                print(dt, d, g, kern, "lengths" if lengths is not None else "-", "ok", float(out.float().abs().sum()))
        if ONLY:
            continue
        out = torch.ops.mustafar.sparse_decode(q, kb, k8, vb, v8, kw, vw, ks, 1 / math.sqrt(d), ksc, vsc, ln, "auto", True)
        torch.cuda.synchronize()
        print(dt, d, g, "auto fp8 lengths ok", float(out.float().abs().sum()))

for vdt in (torch.float16, torch.float8_e4m3fn) if not ONLY else ():
    b, h, d, L, chunk, cap = 2, 3, 128, 8, 16, 64
    R = L + chunk + 1
    k = d - round(0.7 * d)
    fp8 = vdt == torch.float8_e4m3fn
    st = dict(k_window=torch.zeros(b, h, R, d, device="cuda", dtype=torch.float16),
              v_window=torch.zeros(b, h, R, d, device="cuda", dtype=torch.float16),
              k_bitmap=torch.zeros(b, h, cap, d // 64, device="cuda", dtype=torch.int64),
              k_values=torch.zeros(b, h, cap, k, device="cuda", dtype=vdt),
              v_bitmap=torch.zeros(b, h, cap, d // 64, device="cuda", dtype=torch.int64),
              v_values=torch.zeros(b, h, cap, k, device="cuda", dtype=vdt),
              k_scale=torch.zeros(b, h, cap, device="cuda", dtype=torch.float16) if fp8 else None,
              v_scale=torch.zeros(b, h, cap, device="cuda", dtype=torch.float16) if fp8 else None,
              lengths=torch.zeros(2, device="cuda", dtype=torch.int32))
    for _ in range(70):
        x = torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16)
        ops.append_decode(x, torch.randn_like(x), *st.values(), L, chunk)
    torch.cuda.synchronize()
    print("append_decode", vdt, "ok", st["lengths"].tolist())
