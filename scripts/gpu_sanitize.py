"""Tiny driver for compute-sanitizer (memcheck / racecheck): every CUDA op once on small inputs."""
import math

import torch

from mustafar.ops.build import load_extension

load_extension()
torch.manual_seed(0)
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
        for kern in ("v4", "v5", "v6", "v6g"):
            for pdl in (True, False):
                out = torch.ops.mustafar.sparse_decode(q, kb, kv, vb, vv, kw, vw, ks, 1 / math.sqrt(d), None, None, None, kern, pdl)
                out2 = torch.ops.mustafar.sparse_decode(q, eb, ev, vb, vv, kw, vw, ks, 1 / math.sqrt(d), None, None, None, kern, pdl)
                torch.cuda.synchronize()
                print(dt, d, g, kern, f"pdl={pdl}", "ok", float(out.float().abs().sum()),
                      float(out2.float().abs().sum()), float(dense.float().abs().sum()))
