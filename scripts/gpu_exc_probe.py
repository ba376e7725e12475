"""Probe: does a C++ exception thrown from a torch extension kill the process on this machine?"""
import os
import sys

import torch
from torch.utils.cpp_extension import load_inline

src = r'''
#include <torch/extension.h>
#include <torch/library.h>
at::Tensor boom(const at::Tensor& x) { TORCH_CHECK(false, "boom from C++"); return x; }
at::Tensor boomv(const at::Tensor& x) { TORCH_CHECK_VALUE(false, "value boom"); return x; }
TORCH_LIBRARY(probe_%s, m) { m.def("boom(Tensor x) -> Tensor"); m.def("boomv(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(probe_%s, CPU, m) { m.impl("boom", &boom); m.impl("boomv", &boomv); }
'''
variant = sys.argv[1]
flags = {"plain": [], "omp": ["-O3", "-fopenmp"], "full": ["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c"]}[variant]
ld = ["-fopenmp"] if variant != "plain" else []
load_inline(name=f"probe_{variant}", cpp_sources=[src % (variant, variant)], extra_cflags=flags, extra_ldflags=ld,
            is_python_module=False, build_directory=f"/tmp/probe_{variant}" if os.makedirs(f"/tmp/probe_{variant}", exist_ok=True) is None else None)
op = getattr(torch.ops, f"probe_{variant}")
for name in ("boom", "boomv"):
    try:
        getattr(op, name)(torch.zeros(1))
        print(variant, name, "NO ERROR")
    except Exception as e:  # noqa: BLE001
        print(variant, name, "RAISED", type(e).__name__)
