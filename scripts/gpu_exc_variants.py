"""Diagnose: which build flags make a C++ exception from csrc/mustafar.cpp crash the process?

Usage: python3 scripts/gpu_exc_variants.py VARIANT  (builds csrc/mustafar.cpp alone, CPU only, with
the variant's flags, then calls encode_bitmap with a mask that has more than k entries per row,
which must raise ValueError). Run each variant in its own process; a crash shows as a signal.
"""
import os
import sys

import torch
from torch.utils.cpp_extension import load

VARIANTS = {
    "current": (["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c"], ["-fopenmp"]),
    "no_omp_ld": (["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c"], []),
    "no_omp": (["-O3", "-mavx2", "-mfma", "-mf16c"], []),
    "plain": (["-O2"], []),
}
name = sys.argv[1]
cflags, ldflags = VARIANTS[name]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bdir = f"/tmp/exc_{name}"
os.makedirs(bdir, exist_ok=True)
load(name=f"mexc_{name}", sources=[os.path.join(root, "csrc/mustafar.cpp")], extra_cflags=cflags,
     extra_ldflags=ldflags, build_directory=bdir, with_cuda=False, is_python_module=False)
print(name, "loaded", flush=True)
x = torch.randn(2, 64)
mask = torch.ones(2, 64, dtype=torch.bool)
bm, vals = torch.ops.mustafar.encode_bitmap(x, mask, 64)
print(name, "valid call ok", tuple(bm.shape), tuple(vals.shape), flush=True)
try:
    torch.ops.mustafar.decode_bitmap(bm, vals, 100)
except Exception as e:  # noqa: BLE001
    print(name, "decode_bitmap bad head_dim RAISED", type(e).__name__, flush=True)
try:
    torch.ops.mustafar.encode_bitmap(x, mask, 10)
    print(name, "NO ERROR", flush=True)
except Exception as e:  # noqa: BLE001
    print(name, "RAISED", type(e).__name__, str(e)[:80], flush=True)
