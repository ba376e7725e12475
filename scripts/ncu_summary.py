"""Condense `ncu --page raw --csv` output (stdin) to the metrics that explain a decode kernel's time."""
import csv
import sys

rows = list(csv.reader(sys.stdin))
hdr = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
names, units = rows[hdr], rows[hdr + 1]
keys = ("stall", "inst_executed", "wavefront", "bank_conflict", "throughput", "issue_active", "warps_active",
        "dram__bytes", "gpu__time_duration", "registers", "occupancy", "pipe_", "ipc", "Kernel Name")
for r in rows[hdr + 2:]:
    for n, u, v in zip(names, units, r):
        if any(k in n for k in keys) and v not in ("", "0", "0.00", "n/a"):
            print(f"{n} [{u}] = {v}")
    print("-" * 40)
