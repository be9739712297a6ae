#!/usr/bin/env bash
# One GPU check (no network needed): build for the local GPU with every core, run the whole
# test suite on CUDA, run a small workload under compute-sanitizer (memcheck + racecheck), run
# the CUDA microbenchmarks (quick plan, with graph replay), and write logs plus a JSON summary to
# $OUT. Per-step time limits add up to under 8 minutes.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
export MAX_JOBS="$(nproc)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
step() {  # step NAME TIMEOUT_S COMMAND...: runs, logs to $OUT/NAME.log, records status and seconds
  local name="$1" limit="$2"; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}" >> "$OUT/steps.jsonl"
  echo "[gpu_check] $name: rc=$rc ($(( $(date +%s) - start )) s)"
  tail -n 3 "$OUT/$name.log"
  return $rc
}
: > "$OUT/steps.jsonl"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
step build 100 env GRADFUSE_CUDA=1 GRADFUSE_PTXAS_VERBOSE=1 python setup.py build_ext --inplace || exit 1
grep -E "Compiling entry|registers|spill" "$OUT/build.log" > "$OUT/ptxas.txt"
step tests 120 python -m pytest -q -rfE --durations=10 tests --junitxml="$OUT/pytest.xml"  # no -x: one run lists every failure
# No caching allocator under the sanitizers: every tensor gets its own allocation, so an access
# past a tensor's end is reported instead of landing in a neighbour inside a cached segment.
step memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 python scripts/sanitizer_workload.py
step racecheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --error-exitcode 3 python scripts/sanitizer_workload.py
step bench 110 python -m benchmarks.run --device cuda --quick --cuda-graphs --out "$OUT/bench"
python scripts/gpu_check_summary.py "$OUT" > "$OUT/summary.json"
cat "$OUT/summary.json"
