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
python -m pip install -q torch ninja pybind11 pytest hypothesis numpy matplotlib setuptools wheel lightning==2.6.6 accelerate==1.15.0 transformers==5.23.0 zclip==1.0.0
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
built=$(ls gradfuse/_C*.so 2>/dev/null | head -n 1 || true)
# Rebuild only when the extension is missing or a native source / setup.py is newer than it.
if [ -z "$built" ] || [ -n "$(find csrc setup.py -newer "$built" 2>/dev/null | head -n 1)" ] \
    || ! python -c "import gradfuse" 2>/dev/null; then
  python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 20
fi
python -c "import gradfuse; print('gradfuse built; CUDA kernels compiled:', gradfuse.cuda_compiled)"
