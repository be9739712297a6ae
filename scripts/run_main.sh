#!/usr/bin/env bash
# Sets everything up from scratch, then runs the main job: the exploding-gradient training
# demo (plain SGD vs gradfuse) and the microbenchmark table (GPU when present, else CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# Outputs go to build/ (untracked): the committed plots and results stay as they are.
OUT_DIR="$ROOT/build/main-job"
mkdir -p "$OUT_DIR"
python examples/exploding_gradients.py --plot "$OUT_DIR/exploding_gradients.png" --json "$OUT_DIR/exploding_gradients.json"
DEVICE=$(python -c "import torch, gradfuse; print('cuda' if torch.cuda.is_available() and gradfuse.cuda_compiled else 'cpu')")
python -m benchmarks.run --device "$DEVICE" --quick --out "$OUT_DIR/bench" "$@"
