"""Bisect the C++-exception crash seen on the GPU image (docs/REQUESTS.md, 2026-11-28 18:05).

Outcome (H200 image, gcc 13.3, torch 2.11+cu130, 2026-11-28): every variant whose TORCH_CHECK_VALUE
message had a non-literal argument (c10::str's ostringstream path) died with SIGSEGV; `h_plain` /
`h_O2` (literal-only message) raised. Fixed in csrc/mf_check.h (one std::string message), so
`full` now raises; the script stays as the regression probe. It replaces the earlier probes
(gpu_exc_probe*.py, gpu_exc_variants.py, gpu_exc_headers.py), whose known-good op is `h_plain`.

python3 scripts/gpu_exc_bisect.py            # runs every variant in its own process, in parallel
python3 scripts/gpu_exc_bisect.py VARIANT    # one variant: build (CPU only, -O2), call an op that must raise

Variants (each a translation unit built alone with torch.utils.cpp_extension.load):
  full        csrc/mustafar.cpp unchanged
  lib_outside csrc/mustafar.cpp with the TORCH_LIBRARY / TORCH_LIBRARY_IMPL blocks moved out of
              `namespace mustafar`
  no_anon     csrc/mustafar.cpp without the anonymous namespace
  min_ns      a two-line throwing op registered inside a named namespace (the known-good minimal op,
              which raises fine, registered the way csrc/mustafar.cpp registers)
  min_incl    the minimal op with every #include of csrc/mustafar.cpp
  min_sig     the minimal op with decode_bitmap's schema and a TORCH_CHECK_VALUE with int64 arguments
  h_plain     a one-argument op whose message is a literal (no extra flags); h_O2: the same at -O2;
  h_msg       the same op with an int in the message
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = open(os.path.join(ROOT, "csrc", "mustafar.cpp")).read()
INCL = "".join(l + "\n" for l in SRC.splitlines() if l.startswith("#include"))
MIN_FN = ('at::Tensor boom(const at::Tensor& b, const at::Tensor& v, int64_t head_dim) {\n'
          '  TORCH_CHECK_VALUE(head_dim % 64 == 0, "mustafar: head_dim D=", head_dim, " must be a multiple of 64");\n'
          '  return b; }\n')


def _lib_blocks(src):
    i = src.index("\nTORCH_LIBRARY(mustafar") + 1
    j = src.rindex("}  // namespace mustafar")
    return src[:i] + src[j:], src[i:j]


def variant_source(name):
    if name == "full":
        return SRC, "decode_bitmap"
    if name == "lib_outside":
        body, lib = _lib_blocks(SRC)
        lib = lib.replace("&encode_bitmap_cpu", "&mustafar::encode_bitmap_cpu").replace(
            "&decode_bitmap_cpu", "&mustafar::decode_bitmap_cpu").replace(
            "&prune_encode_topk_cpu", "&mustafar::prune_encode_topk_cpu").replace(
            "&sparse_decode_cpu", "&mustafar::sparse_decode_cpu")
        return body + "\n" + lib, "decode_bitmap"
    if name == "no_anon":
        s = SRC.replace("namespace mustafar {\nnamespace {\n", "namespace mustafar {\n", 1)
        s = s.replace("}  // namespace\n\nTORCH_LIBRARY", "\nTORCH_LIBRARY", 1)
        return s, "decode_bitmap"
    head = "#include <ATen/ATen.h>\n#include <torch/library.h>\n"
    sig = "boom(Tensor b, Tensor v, int head_dim) -> Tensor"
    if name == "min_ns":
        return (head + "namespace mx {\nnamespace {\n" + MIN_FN + "}\n"
                f'TORCH_LIBRARY(gx_{name}, m) {{ m.def("{sig}"); }}\n'
                f'TORCH_LIBRARY_IMPL(gx_{name}, CPU, m) {{ m.impl("boom", &boom); }}\n}}\n'), "boom"
    if name == "min_incl":
        return (INCL + "namespace {\n" + MIN_FN + "}\n"
                f'TORCH_LIBRARY(gx_{name}, m) {{ m.def("{sig}"); }}\n'
                f'TORCH_LIBRARY_IMPL(gx_{name}, CPU, m) {{ m.impl("boom", &boom); }}\n'), "boom"
    if name == "min_sig":
        return (head + "namespace {\n" + MIN_FN + "}\n"
                f'TORCH_LIBRARY(gx_{name}, m) {{ m.def("{sig}"); }}\n'
                f'TORCH_LIBRARY_IMPL(gx_{name}, CPU, m) {{ m.impl("boom", &boom); }}\n'), "boom"
    if name.startswith("h_"):  # a known-good op, then one change at a time
        body = 'at::Tensor boom(const at::Tensor& x) { TORCH_CHECK_VALUE(false, "value boom"); return x; }\n'
        if name == "h_msg":
            body = ('at::Tensor boom(const at::Tensor& x) { TORCH_CHECK_VALUE(x.dim() == 5, "value boom dim=", '
                    'x.dim()); return x; }\n')
        return (head + "namespace {\n" + body + "}\n"
                f'TORCH_LIBRARY(gx_{name}, m) {{ m.def("boom(Tensor x) -> Tensor"); }}\n'
                f'TORCH_LIBRARY_IMPL(gx_{name}, CPU, m) {{ m.impl("boom", &boom); }}\n'), "boom1"
    raise SystemExit(f"unknown variant {name}")


VARIANTS = ("full", "lib_outside", "no_anon", "min_ns", "min_incl", "min_sig", "h_plain", "h_O2", "h_msg")


def run_one(name):
    import torch
    from torch.utils.cpp_extension import load

    src, fn = variant_source(name)
    ns = "mustafar" if not fn.startswith("boom") else f"gx_{name}"
    if not fn.startswith("boom"):
        src = src.replace("TORCH_LIBRARY(mustafar,", f"TORCH_LIBRARY(mx_{name},").replace(
            "TORCH_LIBRARY_IMPL(mustafar,", f"TORCH_LIBRARY_IMPL(mx_{name},")
        ns = f"mx_{name}"
    d = f"/tmp/gx_{name}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/v.cpp", "w") as f:
        f.write(src)
    load(name=f"gx_{name}", sources=[f"{d}/v.cpp"], build_directory=d,
         extra_include_paths=[os.path.join(ROOT, "csrc")],
         extra_cflags=[] if name == "h_plain" else ["-O2"], is_python_module=False, with_cuda=False)
    print(name, "loaded", flush=True)
    ops = getattr(torch.ops, ns)
    try:
        if fn == "boom1":
            ops.boom(torch.zeros(1))
        elif fn == "boom":
            ops.boom(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1), 100)
        else:
            ops.decode_bitmap(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 8), 100)
        print(name, "NO ERROR", flush=True)
    except Exception as e:  # noqa: BLE001
        print(name, "RAISED", type(e).__name__, flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run_one(sys.argv[1])
    else:
        procs = {v: subprocess.Popen([sys.executable, __file__, v], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True) for v in VARIANTS}
        for v, p in procs.items():
            out, _ = p.communicate()
            last = [l for l in out.splitlines() if l.startswith(v + " ")]
            last = [" / ".join(last)] if last else last
            print(f"{v:12s} rc={p.returncode:4d} {last[-1] if last else out[-300:]!r}", flush=True)
