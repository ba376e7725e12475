#!/usr/bin/env bash
# Second device call for issue #16 (on the warm machine after scripts/gpu_session.sh, so the build is reused):
# the wall-clock generation cell of the targets. Shape, batches, sparsities and variants by environment:
#   MODELS (llama2-7b) DTYPES (float16) SHAPES (4096:1024) BATCHES (8; set empty with EXTRA=--budget-batches for the
#   budget cells only) SPARS (0.5 0.7) REPS (3)
#   VARIANTS (static-compiled hf-static-compiled mustafar-compiled mustafar-fp8-compiled) T_WALL (560 s)
#   KERNEL (auto: MustafarConfig.decode_kernel, e.g. v6 for the device-lengths candidate) EXTRA (more bench flags,
#   e.g. "--budget-batches --warmup-tokens 160 --prefill-tokens 8192")
#   T_END (if set: the wall-clock stage ends T_END seconds after the script started, the build included, so a fresh
#   machine's compile does not push the call past the device tool's 10 minutes). The benchmark gets --deadline-s
#   T_WALL - DEADLINE_MARGIN (30 s): its cells share that time and skip timed rounds (after the first) that would not fit.
#   RESUME_FROM (a results file of an earlier call, carried in the working tree): copied to $OUT/$NAME.json and run
#   with --resume, so one benchmark's cells can be split over two calls on the same warm machine (the cells it holds
#   are skipped, best_under_budget is recomputed over all of them).
# Run from the repo root: MUSTAFAR_GIT_COMMIT=<sha> bash scripts/gpu_wall.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
t0=$(date +%s)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAX_JOBS=${MAX_JOBS:-16}
python3 -m mustafar.ops.build > "$OUT/build2.log" 2>&1 || { echo BUILD FAILED; tail -20 "$OUT/build2.log"; exit 1; }
name=${NAME:-e2e_wallclock_2}
resume=
if [ -n "${RESUME_FROM:-}" ]; then
  cp "$RESUME_FROM" "$OUT/$name.json" || { echo "RESUME_FROM=$RESUME_FROM: cannot copy it to $OUT"; exit 1; }
  resume=--resume
fi
[ -n "${T_END:-}" ] && T_WALL=$(( T_END - ($(date +%s) - t0) )) && echo "built in $(( $(date +%s) - t0 )) s; T_WALL=$T_WALL"
timeout ${T_WALL:-560} python3 -m mustafar.bench wallclock --device cuda --models ${MODELS:-llama2-7b} \
  --dtypes ${DTYPES:-float16} --shapes ${SHAPES:-4096:1024} --batches ${BATCHES-8} --sparsities ${SPARS:-0.5 0.7} \
  --variants ${VARIANTS:-static-compiled hf-static-compiled mustafar-compiled mustafar-fp8-compiled} \
  --reps ${REPS:-3} --deadline-s $(( ${T_WALL:-560} - ${DEADLINE_MARGIN:-30} )) --decode-kernel ${KERNEL:-auto} ${EXTRA:-} $resume --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
echo "rc=$?"
tail -40 "$OUT/$name.log" | cut -c1-240
