#!/usr/bin/env bash
# Sets everything up from scratch and runs the test suite (CUDA tests skip without a GPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest -q tests "$@"
