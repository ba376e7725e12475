#!/usr/bin/env python3
"""Static SASS count of csrc/proto/position_walk.cu (no GPU needed): SASS instructions per stored value of a
v6-style bitmap walk against a walk over 4-bit gap codes with filler slots and one over channel bytes, each
finding a value's channel and scattering the value into a warp's dense tile.

It compiles the file for sm_90a with nvcc (``-cubin``), disassembles it with cuobjdump, counts each kernel's
instructions (NOPs excluded) and reports the *marginal* count per slot: the difference between two
instantiations of the same kernel with S1 and S2 unrolled slots, divided by S2 - S1, so fixed costs (loads of
the row's first words, the loop, the consumer) cancel. ``per_slot_no_ldg`` leaves out the global loads of the
values and codes (in a real kernel they come from a shared-memory stage, 16 bytes per load).

Usage::

    python scripts/position_walk_sass.py [--nvcc PATH] [--cuobjdump PATH] [--out results/position_walk_sass.json]

cuobjdump comes with a CUDA toolkit or from PyPI (``nvidia-cuda-cuobjdump``, ``nvidia-cuda-nvdisasm``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "csrc", "proto", "position_walk.cu")
#: (kernel, D, S1, S2): the instantiation pairs of the file
PAIRS = (("bitmap_walk", 128, 40, 64), ("gap_walk", 128, 40, 64), ("index_walk", 128, 40, 64),
         ("bitmap_walk", 64, 19, 32), ("gap_walk", 64, 19, 32), ("index_walk", 64, 19, 32))


def count_sass(sass: str) -> dict:
    """``{(kernel, D, S): Counter(opcode)}`` of every ``proto::<kernel><D, S>`` function in cuobjdump's SASS."""
    out = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        m = re.search(r"(bitmap_walk|gap_walk|index_walk)ILi(\d+)ELi(\d+)E", name)
        if not m:
            continue
        ops = collections.Counter()
        for line in block.split("\n"):
            o = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
            if o and o.group(1) != "NOP":
                ops[o.group(1)] += 1
        out[(m.group(1), int(m.group(2)), int(m.group(3)))] = ops
    return out


def marginal(counts: dict) -> list[dict]:
    rows = []
    for kern, d, s1, s2 in PAIRS:
        a, b = counts[(kern, d, s1)], counts[(kern, d, s2)]
        diff = {op: b[op] - a[op] for op in set(a) | set(b) if b[op] != a[op]}
        n = s2 - s1
        total = sum(diff.values())
        rows.append(dict(kernel=kern, D=d, S1=s1, S2=s2, per_slot=total / n,
                         per_slot_no_ldg=(total - diff.get("LDG", 0)) / n,
                         opcodes_per_slot={op: v / n for op, v in sorted(diff.items())}))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nvcc", default=shutil.which("nvcc"))
    ap.add_argument("--cuobjdump", default=os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump"))
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "position_walk_sass.json"))
    args = ap.parse_args(argv)
    if not args.nvcc or not args.cuobjdump:
        print(f"needs nvcc and cuobjdump (nvcc={args.nvcc}, cuobjdump={args.cuobjdump})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "pw.cubin")
        subprocess.run([args.nvcc, "-O3", "-arch=sm_90a", "-cubin", "-o", cubin, SRC], check=True)
        sass = subprocess.run([args.cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout
    rows = marginal(count_sass(sass))
    version = subprocess.run([args.nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    sys.path.insert(0, ROOT)
    from mustafar.bench.common import write_results

    cmd = "python scripts/position_walk_sass.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    path = write_results(args.out, {"rows": rows, "source": "csrc/proto/position_walk.cu", "arch": "sm_90a",
                                    "nvcc": version}, cmd)
    for r in rows:
        print(f"{r['kernel']:12s} D={r['D']:3d} S {r['S1']}->{r['S2']}: {r['per_slot']:.2f} SASS per slot "
              f"({r['per_slot_no_ldg']:.2f} without the global loads)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
