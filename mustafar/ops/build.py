"""Build and load the ``mustafar`` extension (``torch.ops.mustafar.*``).

``load_extension()`` compiles ``csrc/mustafar.cpp`` (the op schemas and CPU registrations) +
``csrc/cpu/*.cpp`` (the CPU kernels) (and ``csrc/cuda/*.cu`` when a GPU, ``CUDA_HOME`` and ``nvcc`` are
present; headers in ``csrc/cuda/*.cuh``, ``*.h``) with :func:`torch.utils.cpp_extension.load` into
``<repo>/build/ext-<torch version>-<cpu|cuXYZ>``; ninja reuses the build on later calls and runs.

Command line::

    python -m mustafar.ops.build               # build (or reuse) and print what was built
    python -m mustafar.ops.build --check-cuda  # nvcc-compile every csrc/cuda/*.cu for sm_90 (no GPU needed)
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import threading

import torch

__all__ = ["load_extension", "repo_root", "cpu_flags", "cuda_sources", "build_info"]

_EXT_NAME = "mustafar_C"
_lock = threading.Lock()
_loaded: dict = {}


def repo_root() -> str:
    """The repository root (the folder holding ``csrc/``)."""
    from mustafar.provenance import repo_root as _root

    return str(_root())


def cpu_sources() -> list[str]:
    root = repo_root()
    return [os.path.join(root, "csrc", "mustafar.cpp")] + sorted(glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))


def cuda_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(repo_root(), "csrc", "cuda", "*.cu")))


def _cpu_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return False
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    have = set(m.group(1).split()) if m else set()
    return all(f in have for f in flags)


def cpu_flags() -> list[str]:
    """C++ flags: -O3, OpenMP (at::parallel_for is an inline OpenMP region in the headers) and, on an
    x86-64 host that has them, AVX2/FMA/F16C (the build is compiled on the machine that runs it)."""
    flags = ["-O3", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64") and _cpu_has("avx2", "fma", "f16c"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_arch_flags() -> list[str]:
    """``-gencode`` for the visible GPU (sm_90 on H200); sm_90 when no GPU is visible."""
    major, minor = 9, 0
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
    num = f"{major}{minor}"
    suffix = "a" if num == "90" else ""  # sm_90a enables wgmma/TMA PTX for H100/H200
    return [f"-gencode=arch=compute_{num}{suffix},code=sm_{num}{suffix}"]


def _want_cuda() -> bool:
    return bool(cuda_sources()) and torch.cuda.is_available() and torch.version.cuda is not None and _nvcc() is not None


def build_info() -> dict:
    """What :func:`load_extension` would build: sources, flags, build directory."""
    with_cuda = _want_cuda()
    tag = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
    ver = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    return {
        "name": _EXT_NAME,
        "sources": cpu_sources() + (cuda_sources() if with_cuda else []),
        "with_cuda": with_cuda,
        "extra_cflags": cpu_flags(),
        "extra_cuda_cflags": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + _cuda_arch_flags() if with_cuda else [],
        "extra_ldflags": ["-fopenmp"],
        "build_directory": os.path.join(repo_root(), "build", f"ext-{ver}-{tag}"),
    }


def load_extension(verbose: bool = False) -> str:
    """Build (or reuse) and load the extension so its ops register into ``torch.ops.mustafar``.

    The fake (meta) kernels for torch.compile are registered by :mod:`mustafar.ops.dispatch` when it
    loads the extension (any ``mustafar.ops`` call, or ``mustafar.ops.backend()``).

    Returns
    -------
    str : path of the loaded shared library's build directory. Raises on build errors.
    """
    with _lock:
        if "dir" in _loaded:
            return _loaded["dir"]
        from torch.utils.cpp_extension import load

        info = build_info()
        os.makedirs(info["build_directory"], exist_ok=True)
        load(
            name=info["name"],
            sources=info["sources"],
            extra_cflags=info["extra_cflags"],
            extra_cuda_cflags=info["extra_cuda_cflags"] or None,
            extra_ldflags=info["extra_ldflags"],
            build_directory=info["build_directory"],
            with_cuda=info["with_cuda"],
            is_python_module=False,
            verbose=verbose,
        )
        _loaded["dir"] = info["build_directory"]
        _loaded["info"] = info
        return info["build_directory"]


def check_cuda(verbose: bool = True) -> int:
    """Compile every ``csrc/cuda/*.cu`` to an object file (``nvcc -c``, sm_90) in ``build/cuda-check``.

    Needs nvcc but no GPU. Returns the number of files that failed.
    """
    srcs = cuda_sources()
    if not srcs:
        print("mustafar.ops.build --check-cuda: no csrc/cuda/*.cu files; nothing to check")
        return 0
    nvcc = _nvcc()
    if nvcc is None:
        print("mustafar.ops.build --check-cuda: nvcc not found (set CUDA_HOME)", file=sys.stderr)
        return len(srcs)
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    out_dir = os.path.join(repo_root(), "build", "cuda-check")
    os.makedirs(out_dir, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    incs = []
    # A CPU-only torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h that every c10/cuda
    # header includes; for this compile-only check supply its (one-line) content. The real build on
    # a CUDA torch uses the real header.
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in include_paths()):
        shim = os.path.join(out_dir, "shim", "c10", "cuda", "impl")
        os.makedirs(shim, exist_ok=True)
        with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs += ["-isystem", os.path.join(out_dir, "shim")]
    for p in include_paths() + [sysconfig.get_path("include"), os.path.join(repo_root(), "csrc")]:
        incs += ["-isystem", p]
    base = (
        [nvcc, "-c", "-std=c++20", "-O3", "-lineinfo", "--expt-relaxed-constexpr",
         "-gencode=arch=compute_90a,code=sm_90a", "--compiler-options", "-fPIC",
         f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H",
         f"-DTORCH_EXTENSION_NAME={_EXT_NAME}"]
        + list(COMMON_NVCC_FLAGS) + incs
    )
    def compile_one(src: str):
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        return subprocess.run(base + [src, "-o", obj], capture_output=True, text=True)

    # one nvcc per file, in parallel (the fp16 / bf16 decode units are the slow ones)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(len(srcs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_one, srcs))
    failed = 0
    for src, res in zip(srcs, results):
        ok = res.returncode == 0
        failed += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {os.path.relpath(src, repo_root())}")
        if (not ok or verbose) and (res.stdout.strip() or res.stderr.strip()):
            print((res.stdout + res.stderr).rstrip())
    print(f"{len(srcs) - failed}/{len(srcs)} compiled into {os.path.relpath(out_dir, repo_root())}")
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mustafar.ops.build", description=__doc__.split("\n")[0])
    ap.add_argument("--check-cuda", action="store_true", help="nvcc-compile csrc/cuda/*.cu for sm_90 (no GPU needed)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.check_cuda:
        return 1 if check_cuda(verbose=args.verbose) else 0
    info = build_info()
    d = load_extension(verbose=args.verbose)
    ops = [n for n in ("encode_bitmap", "decode_bitmap", "prune_encode_topk", "sparse_decode", "append_decode")
           if hasattr(torch.ops.mustafar, n)]
    cuda_ok = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"mustafar::{n}", "CUDA") for n in ops) if ops else False
    print(f"built {info['name']} in {d}")
    print("  sources: " + ", ".join(os.path.relpath(s, repo_root()) for s in info["sources"]))
    print(f"  cflags: {' '.join(info['extra_cflags'])}")
    if info["with_cuda"]:
        print(f"  cuda cflags: {' '.join(info['extra_cuda_cflags'])}")
    print(f"  ops: {', '.join('mustafar::' + n for n in ops)}; CUDA kernels: {cuda_ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
