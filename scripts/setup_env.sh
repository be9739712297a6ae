#!/usr/bin/env bash
# Creates .venv (if missing), installs torch + build/test deps, and builds gradfuse._C in place.
# Sourced by run_main.sh and run_tests.sh; safe to re-run (pip and ninja skip finished work).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${GRADFUSE_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch ninja pybind11 pytest hypothesis numpy matplotlib setuptools wheel
# CI only compiles the CUDA sources (no GPU): one arch keeps the build short.
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 20
python -c "import gradfuse; print('gradfuse built; CUDA kernels compiled:', gradfuse.cuda_compiled)"
