#!/usr/bin/env bash
# Sets everything up from scratch, then runs the main job: the exploding-gradient training
# demo (plain SGD vs gradfuse) and the microbenchmark table (GPU when present, else CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python examples/exploding_gradients.py
DEVICE=$(python -c "import torch, gradfuse; print('cuda' if torch.cuda.is_available() and gradfuse.cuda_compiled else 'cpu')")
python -m benchmarks.run --device "$DEVICE" --quick "$@"
