"""Determinism: the same inputs give bit-identical parameters, momentum and norms across runs,
and on CPU across thread counts (chunk boundaries of 16384 elements depend only on the sizes),
for sizes crossing the chunk boundaries and for lists of hundreds of tensors."""
import os
import subprocess
import sys

import pytest
import torch

from data import generator, many_shapes, randn
from gradfuse import FusedAccumSGD
from tolerances import assert_bitwise

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
CHUNK = 16384
# Crossing chunk boundaries alone and together; > 4 chunks (one parallel task) in total so two
# threads really split the work.
BOUNDARY_SHAPES = [(CHUNK - 1,), (CHUNK + 1,), (3, CHUNK + 5), (), (1,), (4 * CHUNK + 3,), (2 * CHUNK,)]


def _layouts(kind):
    gen = generator(5)
    if kind == "chunk-boundaries":
        shapes = BOUNDARY_SHAPES
    else:
        shapes = many_shapes(gen, 400) + [(CHUNK + 7,)] * 5
    dtypes = [(F32, F64, BF16, F16)[i % 4] if kind == "many-tensors" else (F32, BF16, F32, F64)[i % 4]
              for i in range(len(shapes))]
    return shapes, dtypes


def _run(device, kind, seed, k=2, cycles=3):
    shapes, dtypes = _layouts(kind)
    gen = generator(seed)
    params = [randn(s, d, device, gen) for s, d in zip(shapes, dtypes)]
    half = len(params) // 2
    opt = FusedAccumSGD([dict(params=params[:half], momentum=0.9, dampening=0.1, weight_decay=0.01),
                         dict(params=params[half:], momentum=0.5, nesterov=True)],
                        lr=0.1, accumulation_steps=k, max_grad_norm=5.0)
    norms = []
    for t in range(k * cycles):
        for i, p in enumerate(params):
            g = randn(p.shape, p.dtype, device, gen)
            p.grad = None if (t + i) % 7 == 3 else g  # some missing gradients: the mixed paths too
        opt.step()
        opt.zero_grad()
        if opt.micro_step == 0:
            norms.append(opt.last_grad_norm.clone())
    buffers = [opt.state[p]["momentum_buffer"] for p in params] if cycles else []
    return params, buffers, norms


def _assert_identical(a, b, what):
    (pa, ba, na), (pb, bb, nb) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert_bitwise(x, y, f"{what}: param {i} {tuple(x.shape)}")
    for i, (x, y) in enumerate(zip(ba, bb)):
        assert_bitwise(x, y, f"{what}: momentum {i}")
    for c, (x, y) in enumerate(zip(na, nb)):
        assert_bitwise(x, y, f"{what}: norm of cycle {c}")


@pytest.mark.parametrize("kind", ["chunk-boundaries", "many-tensors"])
def test_two_runs_are_bit_identical(device, seed, kind):
    first = _run(device, kind, seed)
    second = _run(device, kind, seed)
    _assert_identical(first, second, "run 1 vs run 2")
    initial = _run(device, kind, seed, cycles=0)[0]
    assert all(not torch.equal(p, q) for p, q in zip(first[0], initial)
               if p.numel() and p.dtype in (F32, F64)), "the runs should train"
    assert len(first[2]) == 3 and all(float(n) > 5.0 for n in first[2]), "clipping meant to be active"


_THREADS_SCRIPT = """
import sys, torch
import test_determinism as td
out = {}
for threads in (2, 1):  # 2 first: returning to 2 threads after 1 can stall small ops on some hosts
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    out[threads] = {kind: td._run(torch.device("cpu"), kind, int(sys.argv[2])) for kind in td.KINDS}
torch.save(out, sys.argv[1])
"""
KINDS = ["chunk-boundaries", "many-tensors"]


def test_cpu_thread_count_does_not_change_bits(device, seed, tmp_path):
    # In a child process: changing torch's thread count back and forth can leave this host's
    # OpenMP pool stalling small ops for the rest of the process (seen with plain torch too).
    if device.type != "cpu":
        pytest.skip("thread count is a CPU matter")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = tmp_path / "runs.pt"
    subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(out), str(seed)], check=True, env=env,
                   cwd=os.path.dirname(__file__), timeout=300)
    runs = torch.load(out, weights_only=True)
    for kind in KINDS:
        _assert_identical(runs[1][kind], runs[2][kind], f"{kind}: 1 thread vs 2 threads")
        assert all(len(part) for part in runs[1][kind])
