"""Probe: does a C++ exception thrown from a torch extension that also has CUDA sources kill the process?"""
import os
import sys

import torch
from torch.utils.cpp_extension import load_inline

cpp = r'''
#include <torch/extension.h>
#include <torch/library.h>
at::Tensor boom(const at::Tensor& x) { TORCH_CHECK(false, "boom from C++"); return x; }
TORCH_LIBRARY(probe_%s, m) { m.def("boom(Tensor x) -> Tensor"); m.def("cboom(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(probe_%s, CPU, m) { m.impl("boom", &boom); }
'''
cu = r'''
#include <ATen/ATen.h>
#include <torch/library.h>
__global__ void k(float* x) { x[0] += 1.f; }
at::Tensor cboom(const at::Tensor& x) { k<<<1, 1>>>(x.data_ptr<float>()); TORCH_CHECK(false, "boom from .cu"); return x; }
TORCH_LIBRARY_IMPL(probe_%s, CUDA, m) { m.impl("cboom", &cboom); }
'''
variant = sys.argv[1]
cflags = {"cu_plain": [], "cu_arch": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a"]}[variant]
bd = f"/tmp/probe_{variant}"
os.makedirs(bd, exist_ok=True)
load_inline(name=f"probe_{variant}", cpp_sources=[cpp % (variant, variant)], cuda_sources=[cu % variant],
            extra_cuda_cflags=cflags, extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
            is_python_module=False, build_directory=bd, with_cuda=True)
op = getattr(torch.ops, f"probe_{variant}")
for name, dev in (("boom", "cpu"), ("cboom", "cuda")):
    try:
        getattr(op, name)(torch.zeros(1, device=dev))
        print(variant, name, "NO ERROR", flush=True)
    except Exception as e:  # noqa: BLE001
        print(variant, name, "RAISED", type(e).__name__, flush=True)
