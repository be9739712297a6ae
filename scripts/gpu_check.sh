#!/usr/bin/env bash
# One GPU check in about 6 minutes (no network needed), sized for one device call:
#   probe    the GPU, torch and compute-sanitizer (which refuses the device under gVisor);
#   build    for the local GPU's architecture only, with every core (ptxas register/spill report);
#   then, side by side:
#     tests       only the tests that exercise CUDA (-k cuda: test_cuda.py and the cuda ids of the
#                 device-parametrized tests), 8 xdist workers, pytest-timeout per test, stopped
#                 by SIGINT so pytest still prints its summary;
#     sanitizers  memcheck, racecheck, initcheck, synccheck over scripts/sanitizer_workload.py;
#   bench    alone on the GPU: CUDA microbenchmarks (quick plan, bf16/fp16 op rows, host us per
#            step), each row appended to bench.jsonl as it finishes;
#   compile  the torch.compile CUDA tests (inductor compiles for tens of seconds) with what is left.
# Whatever fails or times out, $OUT gets summary.json, logs.tar.gz (every log) and the key logs
# beside them: at most 8 files, as the device tool returns no more.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/build/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"  # every log; archived into $OUT at the end
PY="$(command -v python3 || command -v python)"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-370}"  # whole-check wall time; a step gets what is left, at most its own limit
START=$(date +%s)
: > "$WORK/steps.jsonl"

# step NAME LIMIT_S COMMAND...: runs with its log in $WORK/NAME.log, stopped by SIGINT at the
# limit (SIGKILL 15 s later), and records {step, status, rc, seconds} in steps.jsonl.
step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 5 )); then
    record "$name" skipped -1 0 "no time left in the ${BUDGET_S} s budget"
    return 1
  fi
  local begin=$(date +%s) rc status
  timeout -s INT -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
  record "$name" "$status" "$rc" $(( $(date +%s) - begin )) "limit ${limit} s"
  echo "[gpu_check] $name: $status rc=$rc ($(( $(date +%s) - begin )) s of ${limit} s)"
  tail -n 4 "$WORK/$name.log"
  return $rc
}

record() {  # record NAME STATUS RC SECONDS NOTE
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d, "note": "%s"}\n' \
    "$1" "$2" "$3" "$4" "${5//\"/\'}" >> "$WORK/steps.jsonl"
}

# Writes summary.json and the archive whatever happened before (also on an early exit).
finish() {
  trap - EXIT
  "$PY" scripts/gpu_check_summary.py "$WORK" $(( $(date +%s) - START )) > "$OUT/summary.json" 2> "$WORK/summary.err" ||
    printf '{"error": "gpu_check_summary.py failed; see logs.tar.gz summary.err", "steps_file": "steps.jsonl"}\n' > "$OUT/summary.json"
  for f in ptxas.txt tests.log sanitizers.log bench.jsonl bench.log compile_tests.log; do
    [[ -s "$WORK/$f" ]] && cp "$WORK/$f" "$OUT/$f"
  done
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" . 2>/dev/null
  echo "[gpu_check] done in $(( $(date +%s) - START )) s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
  cat "$OUT/summary.json"
}
trap finish EXIT

# ---- probe: the GPU and torch (no GPU: summary only)
nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1
step probe 60 "$PY" -c '
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), "cc %d.%d" % torch.cuda.get_device_capability())
' || exit 1
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"

# ---- build: local arch only, every core; the ptxas report goes to ptxas.txt
step build 200 env GRADFUSE_CUDA=1 GRADFUSE_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
  "$PY" setup.py build_ext --inplace
BUILD_RC=$?
"$PY" scripts/ptxas_report.py "$WORK/build.log" > "$WORK/ptxas.txt" 2>&1
(( BUILD_RC == 0 )) || exit 1
step import 60 "$PY" -c 'import gradfuse, torch; assert gradfuse.cuda_compiled, "built without CUDA kernels"; print(gradfuse.__file__)' || exit 1

# ---- sanitizer probe: refused devices (gVisor) are "unsupported", not failures
SANITIZE=1
if ! command -v compute-sanitizer > /dev/null; then
  record sanitizer_probe unsupported -1 0 "compute-sanitizer is not on the PATH"; SANITIZE=0
elif ! step sanitizer_probe 60 compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$PY" -c 'import torch; torch.ones(4, device="cuda").sum().item()'; then
  SANITIZE=0
  sed -i '$ s/"status": "[a-z]*"/"status": "unsupported"/' "$WORK/steps.jsonl"  # the probe's own record
fi

sanitizers() {  # the four tools side by side; each log also lands in sanitizers.log
  local tool pids=()
  for tool in memcheck racecheck initcheck synccheck; do
    # No caching allocator: every tensor gets its own allocation, so an access past a tensor's
    # end is reported instead of landing in a neighbour inside a cached segment.
    step "$tool" "$SIDE_S" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 3 \
      --print-limit 20 "$PY" scripts/sanitizer_workload.py > /dev/null &
    pids+=($!)
  done
  wait "${pids[@]}"
  for tool in memcheck racecheck initcheck synccheck; do
    { echo "==== $tool"; tail -n 40 "$WORK/$tool.log"; } >> "$WORK/sanitizers.log"
  done
}

# ---- tests and sanitizers side by side (neither is timed), leaving BENCH_S for the benchmarks
BENCH_S="${GPU_CHECK_BENCH_S:-90}"
SIDE_MAX="${GPU_CHECK_SIDE_MAX_S:-150}"
SIDE_S=$(( BUDGET_S - ($(date +%s) - START) - BENCH_S ))
(( SIDE_S > SIDE_MAX )) && SIDE_S=$SIDE_MAX
(( SIDE_S < 60 )) && SIDE_S=60
# About a thousand CUDA test ids, most of their time in float64 references on the host: 8 workers
# when pytest-xdist is there; pytest-timeout stops a hung test, not the run.
# torch.compile tests (inductor: Triton compiles, tens of seconds each) run last, in their own step.
PYTEST_ARGS=(-q -rfEs -p no:cacheprovider --durations=15 -k "${GPU_CHECK_K:-cuda and not test_compile}" --junitxml="$WORK/pytest.xml")
# (180 s: the peak-memory test starts four CUDA processes, slow while the sanitizers load the GPU)
"$PY" -c 'import pytest_timeout' 2> /dev/null && PYTEST_ARGS+=(--timeout=180)
"$PY" -c 'import xdist' 2> /dev/null && PYTEST_ARGS+=(-n 8)
step tests "$SIDE_S" "$PY" -m pytest "${PYTEST_ARGS[@]}" tests &
TESTS_PID=$!
if (( SANITIZE )); then sanitizers; fi
wait $TESTS_PID

# ---- benchmarks alone on the GPU
# GPU_CHECK_BENCH_RESUME: an earlier run's bench.jsonl whose finished rows are kept, not re-measured.
step bench "$BENCH_S" "$PY" -m benchmarks.run --device cuda --quick --cuda-graphs --no-progress --out "$WORK/bench" \
  --rows "$WORK/bench.jsonl" ${GPU_CHECK_BENCH_RESUME:+--resume "$GPU_CHECK_BENCH_RESUME"}
# The backward hooks' norm while hot vs at the cycle's end (decides takes_norm_hot on CUDA): hot_norm.log.
step hot_norm 90 "$PY" -m benchmarks.hot_norm --device cuda --reps 30
# Running sums in .grad vs apart per tensor size (sets RESIDENT_MIN_ELEMENTS): resident_threshold.log.
step resident_threshold 60 "$PY" -m benchmarks.resident_threshold --device cuda --reps 15

# ---- the torch.compile CUDA tests with what the budget leaves
COMPILE_ARGS=(-q -rfEs -p no:cacheprovider -k cuda --junitxml="$WORK/pytest_compile.xml")
"$PY" -c 'import xdist' 2> /dev/null && COMPILE_ARGS+=(-n 4)
[[ -n "${GPU_CHECK_SKIP_COMPILE:-}" ]] && exit 0
step compile_tests 300 "$PY" -m pytest "${COMPILE_ARGS[@]}" tests/test_compile.py
exit 0
