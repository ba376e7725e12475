"""Diagnose: does a C++ exception from a torch op crash the process depending on the headers?

python3 scripts/gpu_exc_headers.py {aten,extension}: builds a two-line op that throws
TORCH_CHECK_VALUE, including either only <ATen/ATen.h> + <torch/library.h> (as csrc/mustafar.cpp
does) or also <torch/extension.h>, and calls it.
"""
import os
import sys

import torch
from torch.utils.cpp_extension import load

variant = sys.argv[1]
head = "#include <ATen/ATen.h>\n#include <torch/library.h>\n"
if variant == "extension":
    head = "#include <torch/extension.h>\n" + head
src = head + f"""
namespace {{
at::Tensor boom(const at::Tensor& x) {{ TORCH_CHECK_VALUE(false, "value boom"); return x; }}
}}
TORCH_LIBRARY(hx_{variant}, m) {{ m.def("boom(Tensor x) -> Tensor"); }}
TORCH_LIBRARY_IMPL(hx_{variant}, CPU, m) {{ m.impl("boom", &boom); }}
"""
d = f"/tmp/hx_{variant}"
os.makedirs(d, exist_ok=True)
with open(f"{d}/hx.cpp", "w") as f:
    f.write(src)
load(name=f"hx_{variant}", sources=[f"{d}/hx.cpp"], build_directory=d, is_python_module=False, with_cuda=False)
try:
    getattr(torch.ops, f"hx_{variant}").boom(torch.zeros(1))
    print(variant, "NO ERROR", flush=True)
except Exception as e:  # noqa: BLE001
    print(variant, "RAISED", type(e).__name__, flush=True)
