#!/usr/bin/env bash
# One device call: build, check, sanitize, time. Run from the repo root on the GPU machine.
#   STAGES="build test sanitize sass overhead bench e2e" bash scripts/gpu_all.sh      (default: all but e2e)
# Logs and JSON land in $OUT (or ./gpu_out when OUT is unset). The device copy has no .git: pass the
# commit for the results' provenance, e.g. run "MUSTAFAR_GIT_COMMIT=<git rev-parse HEAD here> bash scripts/gpu_all.sh".
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" results
STAGES=${STAGES:-"build test sanitize sass overhead bench"}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
has() { [[ " $STAGES " == *" $1 "* ]]; }
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 ))s] $*"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv

if has build; then
  stamp build
  MAX_JOBS=16 $PY -m mustafar.ops.build -v > "$OUT/build.log" 2>&1; rc=$?
  grep -E "registers|spill|error" "$OUT/build.log" | grep -B0 -A0 -E "error|spill" | sort | uniq -c | head -20
  tail -5 "$OUT/build.log"
  [ $rc -eq 0 ] || { echo "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1; }
fi
if has test; then
  stamp test
  timeout ${TEST_TIMEOUT:-900} $PY -m pytest tests/test_gpu.py -q -p no:cacheprovider -rf 2>&1 | tee "$OUT/test_gpu.log" | tail -25
fi
if has sanitize; then
  stamp sanitize
  for tool in memcheck racecheck; do
    echo "##### compute-sanitizer --tool $tool" >> "$OUT/sanitize.log"
    timeout ${SAN_TIMEOUT:-200} compute-sanitizer --tool $tool --print-limit 20 $PY scripts/gpu_sanitize.py >> "$OUT/sanitize.log" 2>&1
    echo "$tool rc=$?"; tail -3 "$OUT/sanitize.log"
  done
fi
if has sass; then
  stamp sass
  so=$(ls build/ext-*/mustafar_C.so 2>/dev/null | head -1)
  if [ -n "$so" ]; then
    cuobjdump --dump-sass "$so" > /tmp/sass_all.txt 2>/dev/null
    $PY - /tmp/sass_all.txt "$OUT/sass_decode_half128.txt" <<'PYEOF'
import re, sys, collections
txt = open(sys.argv[1]).read()
keep = []
for fn in re.split(r"\n\s*Function : ", txt)[1:]:
    name = fn.split("\n", 1)[0]
    if "sparse_decode_kernel" not in name and "sd_scatter_kernel" not in name and "sd_rows_kernel" not in name:
        continue
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", fn)
    c = collections.Counter(o.split(".")[0] for o in ops)
    print(name[:100], "total", len(ops), dict(c.most_common(12)))
    if "6__half" in name and ("Li128ELi1EEEv" in name or "Li128ELi1ELi2EEEv" in name or "Li128ELi1ELi1ELi38EEEv" in name):
        keep.append(fn)  # v4, v5 (pair mode) and v6 (k = 38 compiled in), fp16, D=128, one head per KV head
open(sys.argv[2], "w").write("\n".join(keep))
PYEOF
  fi
fi
if has overhead; then
  stamp overhead
  timeout ${OVH_TIMEOUT:-300} $PY -m mustafar.bench overhead --out results/decode_overhead_h200.json 2>&1 | tee "$OUT/overhead.log" | tail -60
  cp results/decode_overhead_h200.json "$OUT/" 2>/dev/null
fi
if has bench; then
  stamp bench
  timeout ${BENCH_TIMEOUT:-900} $PY -m mustafar.bench kernel ${BENCH_ARGS:-} --out results/kernel_h200.json 2>&1 | tee "$OUT/bench_kernel.log" | tail -80
  cp results/kernel_h200.json "$OUT/" 2>/dev/null
fi
if has e2e; then
  stamp e2e
  E2E_OUT=${E2E_OUT:-results/e2e_h200.json}
  timeout ${E2E_TIMEOUT:-300} $PY -m mustafar.bench e2e ${E2E_ARGS:-} --out "$E2E_OUT" 2>&1 | tee "$OUT/bench_e2e.log" | tail -40
  cp "$E2E_OUT" "$OUT/" 2>/dev/null
fi
stamp done
