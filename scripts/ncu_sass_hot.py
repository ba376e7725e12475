"""Summarise an Nsight Compute source-page CSV (SASS): the instructions executed most, and totals.

    ncu --section SourceCounters --import-source no -k regex:sd_rows_kernel --launch-skip 2 --launch-count 1 \
        -o prof python3 scripts/gpu_profile.py
    ncu -i prof.ncu-rep --page source --csv --print-source sass > src.csv
    python3 scripts/ncu_sass_hot.py src.csv [top]
"""
import csv
import sys
from collections import Counter

rows = list(csv.reader(open(sys.argv[1], newline="")))
top = int(sys.argv[2]) if len(sys.argv) > 2 else 60
hdr_i = next(i for i, r in enumerate(rows) if any("Instructions Executed" in c for c in r))
hdr = rows[hdr_i]
ie = next(i for i, c in enumerate(hdr) if c.strip() == "Instructions Executed" or c.startswith("Instructions Executed"))
src = next(i for i, c in enumerate(hdr) if c.strip() in ("Source", "SASS"))
ad = next((i for i, c in enumerate(hdr) if c.strip().startswith("Address")), None)
data = []
for r in rows[hdr_i + 1:]:
    if len(r) <= max(ie, src):
        continue
    try:
        n = float(r[ie].replace(",", ""))
    except ValueError:
        continue
    data.append((r[ad] if ad is not None else "", r[src].strip(), n))
tot = sum(n for _, _, n in data)
print(f"columns: {hdr}")
print(f"total warp instructions executed: {tot:,.0f} over {len(data)} SASS lines")
ops = Counter()
for _, s, n in data:
    op = s.split()[0] if s else "?"
    if op.startswith("@") and len(s.split()) > 1:
        op = s.split()[1]
    ops[op.split(".")[0]] += n
print("by opcode:", ", ".join(f"{o} {n / tot * 100:.1f}%" for o, n in ops.most_common(25)))
# runs of consecutive lines with the same count = basic blocks
blocks = []
cur = None
for a, s, n in data:
    if cur and cur[2] == n:
        cur[1] = a
        cur[3] += 1
    else:
        cur = [a, a, n, 1, s]
        blocks.append(cur)
blocks.sort(key=lambda b: -b[2] * b[3])
print(f"{'from':>8} {'to':>8} {'count':>12} {'lines':>5} {'share':>6}  first instruction")
for b in blocks[:top]:
    print(f"{b[0]:>8} {b[1]:>8} {b[2]:12,.0f} {b[3]:5d} {b[2] * b[3] / tot * 100:5.1f}%  {b[4][:70]}")
