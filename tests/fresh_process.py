"""Runs a script in a fresh Python process with lazy CUDA module loading, the way a kernel's very
first use (inside a graph capture, say) happens in a new training process."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_lazy_cuda_script(script, timeout=120):
    """Fails the calling test unless the script exits 0 and prints 'ok'."""
    env = dict(os.environ, CUDA_MODULE_LOADING="LAZY",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
