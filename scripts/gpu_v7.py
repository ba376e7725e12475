"""v7 decode kernel on the GPU: float64 checks over the coverage grid and append_decode checks (timings:
``python -m mustafar.bench kernel``).

One device call: ``python3 scripts/gpu_v7.py --out $OUT`` (after ``python3 -m mustafar.ops.build``).
Checks (fresh random inputs, outputs poisoned with NaN by MUSTAFAR_CUDA_POISON=1): every (dtype, D, G,
sparsity, value format, lengths/ring, kv_start) case against a float64 reference built from the dense
dequantized K/V, rel. error < 1e-2; "auto" (v6 wherever v6 serves, else v7), v7, v7g, and v6 by name where it serves
(G <= 8, D 64 / 128, k <= 64, 16-bit values or e4m3 on both sides), with and without device lengths.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ["MUSTAFAR_CUDA_POISON"] = "1"  # outputs poisoned with NaN before every kernel run
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mustafar import ops  # noqa: E402
from mustafar.ops import reference as R  # noqa: E402

OP = None


def kept(D, s):
    return D - int(math.floor(s * D + 0.5))


def make_store(x, k, f8):
    """x [B,H,T,D] -> bitmap, values (model dtype or e4m3), scale, dense (float64, what the kernel must see)"""
    bm, vals = ops.prune_encode_topk(x, k)
    if f8:
        q8, s = R.quantize_fp8(vals)
        dq = (q8.float() * s.float()[..., None]).to(torch.float64)
        dense = R.decode_bitmap(bm, dq, x.shape[-1])
        return bm, q8, s, dense
    return bm, vals, None, R.decode_bitmap(bm, vals.double(), x.shape[-1])


def ref_attn(q, Kd, Vd, scale, kv_start=None):
    """q [B,Hq,D]; Kd, Vd [B,Hkv,T,D] float64 (positions 0..T-1)"""
    B, Hq, D = q.shape
    G = Hq // Kd.shape[1]
    K = Kd.repeat_interleave(G, 1)
    V = Vd.repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhtd->bht", q.double(), K) * scale
    if kv_start is not None:
        pos = torch.arange(K.shape[2], device=q.device)
        s = s.masked_fill(pos[None, None, :] < kv_start.long()[:, None, None], -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    out = torch.einsum("bht,bhtd->bhd", p, V) / den.clamp_min(1e-300)
    return torch.where(den > 0, out, torch.zeros_like(out))


def call(q, kb, kvl, vb, vvl, kw, vw, kvs, scale, ksc=None, vsc=None, lengths=None, kernel="auto"):
    return torch.ops.mustafar.sparse_decode(q, kb, kvl, vb, vvl, kw, vw, kvs, scale, ksc, vsc, lengths, kernel, True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(log):
    res = []
    torch.manual_seed(7)
    cases = []
    for dt in (torch.float16, torch.bfloat16):
        for D in (64, 128, 256):
            for G in (1, 2, 3, 4, 5, 6, 7, 8):
                for s in (0.0, 0.5, 0.6, 0.7, 0.8, 0.9):
                    if D == 256 and s in (0.0, 0.6):
                        continue
                    for f8 in ((False, False), (True, True), (True, False), (False, True)):
                        if f8 != (False, False) and (G not in (1, 4, 7) or s not in (0.5, 0.7, 0.9)):
                            continue
                        cases.append((dt, D, G, s, f8))
    fails = 0
    for i, (dt, D, G, s, (k8, v8)) in enumerate(cases):
        B = (3, 2, 1)[i % 3]
        Tc = (1111, 37, 2049, 0, 64)[i % 5]
        R_ = (33, 300, 17, 64, 1)[i % 5]  # ring rows
        Hkv = 2 if G > 1 else 3
        Hq = Hkv * G
        k = kept(D, s)
        q = torch.randn(B, Hq, D, device="cuda").to(dt)
        Kx = torch.randn(B, Hkv, Tc, D, device="cuda").to(dt)
        Vx = torch.randn(B, Hkv, Tc, D, device="cuda").to(dt)
        if i % 4 == 1 and Tc:  # empty 32-bit words in some rows (generic walk)
            Kx[:, :, ::3, :32] *= 1e-4
            Vx[:, :, 1::4, 32:64] *= 1e-4
        kb, kvl, ksc, Kd = make_store(Kx, k, k8)
        vb, vvl, vsc, Vd = make_store(Vx, k, v8)
        kw = torch.randn(B, Hkv, R_, D, device="cuda").to(dt)
        vw = torch.randn(B, Hkv, R_, D, device="cuda").to(dt)
        sc = 1.0 / math.sqrt(D)
        for mode in ("plain", "ring"):
            if mode == "plain":
                n_c, n_w, lengths = Tc, R_, None
                Kfull = torch.cat([Kd, kw.double()], 2)
                Vfull = torch.cat([Vd, vw.double()], 2)
            else:
                n_c = max(0, Tc - (i % 7) * 5)
                n_w = R_ - (i % 2) if R_ > 1 else R_
                lengths = torch.tensor([n_c, n_w], dtype=torch.int32, device="cuda")
                slots = [(n_c + j) % R_ for j in range(n_w)]
                Kfull = torch.cat([Kd[:, :, :n_c], kw.double()[:, :, slots]], 2)
                Vfull = torch.cat([Vd[:, :, :n_c], vw.double()[:, :, slots]], 2)
            T = n_c + n_w
            kvs = torch.randint(0, max(1, T // 2), (B,), device="cuda", dtype=torch.int32) if i % 3 == 0 else None
            if kvs is not None and B > 1:
                kvs[-1] = T + 5  # a fully masked row -> zeros
            ref = ref_attn(q, Kfull, Vfull, sc, kvs)
            # v6 by name, with and without device lengths: G <= 8 (1, 4 or 8 query-head slots), D 64 / 128, k <= 64,
            # 16-bit values or e4m3 on both sides
            v6_ok = G <= 8 and D in (64, 128) and k <= 64 and k8 == v8
            for kern in ("auto", "v7", "v7g") + (("v6",) if v6_ok else ()):
                out = call(q, kb, kvl, vb, vvl, kw, vw, kvs, sc, ksc, vsc, lengths, kern)
                torch.cuda.synchronize()
                e = rel(out, ref) if ref.abs().sum() > 0 else out.double().abs().max().item()
                ok = bool(torch.isfinite(out).all()) and e < 1e-2
                r = dict(dtype=str(dt)[6:], D=D, G=G, sparsity=s, k=k, k8=k8, v8=v8, B=B, Tc=Tc, R=R_, mode=mode,
                         n_c=n_c, n_w=n_w, kv_start=kvs is not None, kernel=kern, rel_err=e, ok=ok)
                res.append(r)
                if not ok:
                    fails += 1
                    if fails < 30:
                        log(f"FAIL {r}")
    log(f"v7 correctness: {sum(r['ok'] for r in res)}/{len(res)} passed, max rel err "
        f"{max(r['rel_err'] for r in res):.2e}")
    return res


def check_append(log):
    """append_decode: 300 steps from a prefilled state; store rows == prune_encode_topk of the same tokens,
    lengths follow the chunked schedule, attention == reference over the visible tokens"""
    res = []
    torch.manual_seed(3)
    for dt, D, s, L, chunk, f8 in ((torch.float16, 128, 0.7, 32, 64, False), (torch.bfloat16, 64, 0.5, 8, 16, True),
                                   (torch.float16, 256, 0.8, 0, 8, False), (torch.float16, 128, 0.6, 16, 1, True)):
        B, H, G, P, steps = 2, 3, 4, 100, 300
        k = kept(D, s)
        C = ((P + steps + 31) // 32) * 32
        Rr = L + chunk + 1
        toksK = torch.randn(B, H, P + steps, D, device="cuda").to(dt)
        toksV = torch.randn(B, H, P + steps, D, device="cuda").to(dt)
        kb = torch.zeros(B, H, C, D // 64, dtype=torch.int64, device="cuda"); vb = torch.zeros_like(kb)
        vdt = torch.float8_e4m3fn if f8 else dt
        kvl = torch.zeros(B, H, C, k, dtype=vdt, device="cuda"); vvl = torch.zeros_like(kvl)
        ksc = torch.ones(B, H, C, dtype=torch.float16, device="cuda") if f8 else None
        vsc = torch.ones_like(ksc) if f8 else None
        kw = torch.zeros(B, H, Rr, D, dtype=dt, device="cuda"); vw = torch.zeros_like(kw)
        n_c = max(0, P - L)
        for src, bm, vl, sc_ in ((toksK, kb, kvl, ksc), (toksV, vb, vvl, vsc)):
            b_, v_ = ops.prune_encode_topk(src[:, :, :n_c].contiguous(), k)
            bm[:, :, :n_c] = b_
            if f8:
                q8, s8 = R.quantize_fp8(v_)
                vl[:, :, :n_c] = q8; sc_[:, :, :n_c] = s8
            else:
                vl[:, :, :n_c] = v_
        for j in range(n_c, P):
            kw[:, :, j % Rr] = toksK[:, :, j]; vw[:, :, j % Rr] = toksV[:, :, j]
        lengths = torch.tensor([n_c, P - n_c], dtype=torch.int32, device="cuda")
        hc, hw = n_c, P - n_c
        worst, ok_all = 0.0, True
        for t in range(P, P + steps):
            torch.ops.mustafar.append_decode(toksK[:, :, t:t + 1], toksV[:, :, t:t + 1], kw, vw, kb, kvl, vb, vvl,
                                             ksc, vsc, lengths, L, chunk)
            hw += 1
            if hw > L + chunk:
                hc += chunk; hw -= chunk
            if t % 37 == 0 or t == P + steps - 1:
                got = lengths.tolist()
                ok_all &= got == [hc, hw]
                # the visible store rows vs a fresh encoding of the same tokens
                b_, v_ = ops.prune_encode_topk(toksK[:, :, :hc].contiguous(), k)
                ok_all &= bool((kb[:, :, :hc] == b_).all())
                if not f8:
                    ok_all &= bool((kvl[:, :, :hc] == v_).all())
                else:
                    q8, s8 = R.quantize_fp8(v_)
                    ok_all &= bool((kvl[:, :, :hc].view(torch.uint8) == q8.view(torch.uint8)).all()) and bool((ksc[:, :, :hc] == s8).all())
                q = torch.randn(B, H * G, D, device="cuda").to(dt)
                out = call(q, kb, kvl, vb, vvl, kw, vw, None, 1 / math.sqrt(D), ksc, vsc, lengths)
                _, _, _, Kd = make_store(toksK[:, :, :hc].contiguous(), k, f8)
                _, _, _, Vd = make_store(toksV[:, :, :hc].contiguous(), k, f8)
                Kf = torch.cat([Kd, toksK[:, :, hc:t + 1].double()], 2)
                Vf = torch.cat([Vd, toksV[:, :, hc:t + 1].double()], 2)
                e = rel(out, ref_attn(q, Kf, Vf, 1 / math.sqrt(D)))
                worst = max(worst, e)
                ok_all &= e < 1e-2
        r = dict(dtype=str(dt)[6:], D=D, sparsity=s, L=L, chunk=chunk, fp8=f8, steps=steps, ok=bool(ok_all), max_rel_err=worst)
        res.append(r)
        log(f"append_decode {r}")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "build" / "gpu_v7"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "gpu_v7_check_log.txt", "w")

    def log(m):
        print(m, flush=True)
        logf.write(m + "\n"); logf.flush()

    t0 = time.time()
    ops.backend("cuda")
    from mustafar.provenance import collect
    res = dict(provenance=collect("python3 scripts/gpu_v7.py --out $OUT"))
    res["append"] = check_append(log)
    log(f"append checks {time.time() - t0:.0f} s")
    res["correctness"] = check(log)
    res["wall_s"] = time.time() - t0
    (out / "gpu_v7_check.json").write_text(json.dumps(res, indent=1))
    log(f"done {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
