#!/usr/bin/env bash
# One device call for issues #15 / #16: build, v7 checks, GPU tests, the kernel benchmark (python -m mustafar.bench
# kernel), compiled wall clock, optionally compute-sanitizer memcheck + racecheck (T_SANITIZE > 0: seconds per tool)
# and Nsight Compute counters of v6 / v7 (T_PROFILE > 0: seconds per kernel).
# Each stage has its own time limit so the call ends inside the device tool's 10 minutes; results and logs land
# in $OUT (at most 8 files come back). SANITIZE_KERNELS="v6k ...": the sanitizer runs only those decode kernels;
# KERNEL_PROFILE / KERNEL_KERNELS: the benchmark's --profile and --kernels; T_GAP > 0: the gap-code decode prototype. Run from the repo root: MUSTAFAR_GIT_COMMIT=<sha> bash scripts/gpu_session.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 MAX_JOBS=${MAX_JOBS:-16}
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
if [ "${T_GAP:-0}" -gt 0 ]; then
  # the gap prototype's extension (one translation unit: minutes on a fresh machine) builds beside the main one
  python3 scripts/gap_decode_bench.py --build-only > "$OUT/gap_decode.log" 2>&1 &
  gap_build=$!
fi
stamp build
python3 -m mustafar.ops.build -v > "$OUT/build.log" 2>&1 || { echo BUILD FAILED; grep -B2 -A8 -m5 error "$OUT/build.log"; exit 1; }
if [ "${T_CHECK:-170}" -gt 0 ]; then  # each stage: T_<STAGE>=0 skips it
  stamp v7-check
  timeout ${T_CHECK:-170} python3 scripts/gpu_v7.py --out "$OUT" 2>&1 | grep -v "^append_decode" | tail -25
  grep "^append_decode" "$OUT/gpu_v7_check_log.txt" | cut -c1-200
fi
if [ "${T_TESTS:-150}" -gt 0 ]; then
  stamp gpu-tests
  timeout ${T_TESTS:-150} python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} \
    > "$OUT/gpu_tests.log" 2>&1
  tail -6 "$OUT/gpu_tests.log"
fi
if [ "${T_SANITIZE:-0}" -gt 0 ] && command -v compute-sanitizer > /dev/null; then
  # memcheck and racecheck of every CUDA op (scripts/gpu_sanitize.py), T_SANITIZE seconds each
  stamp sanitize
  for tool in memcheck racecheck; do
    echo "##### compute-sanitizer --tool $tool" >> "$OUT/sanitize.log"
    timeout ${T_SANITIZE} compute-sanitizer --tool $tool --print-limit 20 python3 scripts/gpu_sanitize.py ${SANITIZE_KERNELS:-} \
      >> "$OUT/sanitize.log" 2>&1
    echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitize.log" | tail -1
  done
fi
if [ "${T_BENCH:-180}" -gt 0 ]; then
  stamp kernel-bench
  # KERNEL_PROFILE may name several profiles (one results file each, kernel_<profile>.json), in T_BENCH seconds in all
  tb_end=$(( $(date +%s) + ${T_BENCH:-180} ))
  for prof in ${KERNEL_PROFILE:-quick}; do
    left=$(( tb_end - $(date +%s) )); [ "$left" -gt 5 ] || { echo "no time left for profile $prof"; break; }
    timeout $left python3 -m mustafar.bench kernel --profile $prof ${KERNEL_KERNELS:+--kernels $KERNEL_KERNELS} \
      --out "$OUT/kernel_$prof.json" 2>&1 | grep -v "it/s\]$" | tail -${BENCH_TAIL:-75} | cut -c1-250
  done
fi
if [ "${T_GAP:-0}" -gt 0 ]; then
  # the gap-code decode prototype (scripts/gap_decode_bench.py): its extension built first (started beside the main
  # build above; a per-shape limit must not cut it), then one process per shape (-X faulthandler: a crash names its
  # line and costs one shape), rows appended to one file; GAP_SHAPES: names from its SHAPES in the order to run
  # (default all, in SHAPES order)
  stamp gap-decode
  tg_end=$(( $(date +%s) + T_GAP ))
  wait $gap_build
  echo "gap build rc=$?"
  shapes=${GAP_SHAPES:-$(python3 scripts/gap_decode_bench.py --list)}
  for s in $shapes; do
    left=$(( tg_end - $(date +%s) )); [ "$left" -gt 10 ] || { echo "no time left for gap shape $s"; break; }
    timeout $left python3 -X faulthandler scripts/gap_decode_bench.py --only $s --nwarps ${GAP_NWARPS:-8 10} --append \
      --out "$OUT/gap_decode.json" >> "$OUT/gap_decode.log" 2>&1
    echo "gap $s rc=$?"
  done
  tr '\r' '\n' < "$OUT/gap_decode.log" | grep -v "it/s\]\|^\s*$\|^gap decode:" | tail -${GAP_TAIL:-30} | cut -c1-300
fi
if [ "${T_WALL:-200}" -gt 0 ]; then
  stamp wallclock
  timeout ${T_WALL:-200} python3 -m mustafar.bench wallclock --device cuda --models llama2-7b --dtypes float16 \
    --shapes ${WALL_SHAPE:-2048:128} --batches ${WALL_BATCHES:-8} --sparsities ${WALL_SPARS:-0.7} \
    --variants ${WALL_VARIANTS:-dynamic static-compiled mustafar mustafar-compiled mustafar-fp8-compiled} --reps ${WALL_REPS:-2} \
    --out "$OUT/e2e_wallclock.json" > "$OUT/wallclock.log" 2>&1
  grep -v "cudagraph_utils.py" "$OUT/wallclock.log" | tail -30 | cut -c1-240
  grep -m3 "skipping cudagraphs" "$OUT/wallclock.log" | cut -c1-240
fi
if [ "${T_PROFILE:-0}" -gt 0 ] && command -v ncu > /dev/null; then
  # L2 sector traffic, L1 hit rate, issue activity of v6 / v7 at B=8, T=16K, 70 % (kernel_notes.md, session 10)
  stamp profile
  for kern in v6 v7; do
    echo "== $kern" >> "$OUT/ncu_v7.txt"
    timeout ${T_PROFILE} ncu --clock-control none -k "regex:sd_rows_kernel|^decode_kernel" --launch-skip 2 --launch-count 1 \
      --metrics gpu__time_duration.sum,lts__t_sectors_srcunit_tex_op_read.sum,l1tex__t_sector_hit_rate.pct,dram__bytes_read.sum,sm__inst_executed.sum,smsp__warps_active.avg.per_cycle_active \
      python3 scripts/gpu_profile.py --kernel $kern >> "$OUT/ncu_v7.txt" 2>&1
  done
  grep -E "^==|duration|sectors|hit_rate|dram__bytes|inst_executed|warps_active" "$OUT/ncu_v7.txt" | cut -c1-160
  # why the warps wait (session 10: both kernels latency-bound at ~2.7 active warps per scheduler): the
  # WarpStateStats section's raw stall counters (per issued instruction) of v6 and v7
  for kern in v6 v7; do
    echo "== $kern" >> "$OUT/ncu_stalls.txt"
    timeout ${T_PROFILE} ncu --clock-control none -k "regex:sd_rows_kernel|^decode_kernel" --launch-skip 2 --launch-count 1 \
      --section WarpStateStats --section SchedulerStats --page raw \
      python3 scripts/gpu_profile.py --kernel $kern 2>&1 | grep -E "^==|stalled|issue_active|warps_eligible" >> "$OUT/ncu_stalls.txt"
  done
  grep -E "^==|long_scoreboard|short_scoreboard|mio_throttle|barrier|wait|math_pipe|lg_throttle|no_instruction|issue_active" \
    "$OUT/ncu_stalls.txt" | grep -v "_pred_on\|not_issued" | cut -c1-160 | head -60
fi
stamp done
