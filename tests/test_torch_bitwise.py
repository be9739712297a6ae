"""FusedAccumSGD is bit-identical to torch.optim.SGD(foreach=False) on the CPU for float32 and float64
parameters with accumulation_steps=1 and no clipping (grad_mult = +-1), for any weight_decay,
momentum, dampening, nesterov and maximize, over several steps.

torch's CPU single-tensor SGD is a chain of ATen ops, each rounded once, and ATen's vectorized
`x.add(y, alpha=a)` is one fused multiply-add fma(y, a, x); gradfuse's sgd_update
(csrc/element_math.h) spells the same fused multiply-adds in the same order. Every gradfuse CPU
build (default, AVX2, AVX-512) uses a true single-rounding fma, so each gives these bits; the
default build is checked in-process and in a fresh process under ATEN_CPU_CAPABILITY=default.

The target is torch with its AVX2/AVX-512 kernels. torch's own baseline ("default") kernels round
`alpha * y` and the sum separately, so torch under ATEN_CPU_CAPABILITY=default differs from torch
on AVX2 (and from gradfuse) in the last bit; its results are therefore taken from this process.

Run as a script (`python tests/test_torch_bitwise.py INPUTS OUTPUTS`), this file is the fresh child:
it runs gradfuse's side of the grid on INPUTS and saves the results.
"""
import itertools
import os
import subprocess
import sys

import pytest
import torch

import gradfuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(gradfuse.__file__)))
# Vector bodies and scalar tails of every CPU build (8/16 float lanes, 4/8 double lanes).
SIZES = [1, 7, 33, 1000 + 3]
STEPS = 5
LR = 0.1  # a large lr makes a 1-ulp difference in the update likely to show in the parameter
DTYPES = [torch.float32, torch.float64]


def configs():
    """The grid: weight_decay {0, 0.01} x momentum {0, 0.9} x dampening {0, 0.1} x nesterov x
    maximize, without the combinations torch refuses (nesterov needs momentum and no dampening)."""
    out = []
    for wd, momentum, dampening, nesterov, maximize in itertools.product(
            (0.0, 0.01), (0.0, 0.9), (0.0, 0.1), (False, True), (False, True)):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        out.append(dict(lr=LR, weight_decay=wd, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        maximize=maximize))
    return out


CONFIGS = configs()


def config_id(c):
    return (f"wd{c['weight_decay']}-m{c['momentum']}-damp{c['dampening']}"
            f"{'-nesterov' if c['nesterov'] else ''}{'-maximize' if c['maximize'] else ''}")


def make_inputs(dtype, seed):
    """Initial parameters and STEPS fresh gradients per size."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in SIZES]
    grads = [[torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n in SIZES] for _ in range(STEPS)]
    return params, grads


def run(optimizer_class, inputs, config, **extra):
    """Parameters and momentum buffers after STEPS steps of optimizer_class on the inputs."""
    start, grads = inputs
    params = [p.clone().requires_grad_() for p in start]
    opt = optimizer_class(params, **config, **extra)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad()
    buffers = [opt.state[p].get("momentum_buffer") for p in params]
    return [p.detach().clone() for p in params], [None if b is None else b.clone() for b in buffers]


def run_torch(inputs, config):
    return run(torch.optim.SGD, inputs, config, foreach=False)


def run_gradfuse(inputs, config):
    return run(gradfuse.FusedAccumSGD, inputs, config)


def seed_of(dtype, index):
    return 1000 * DTYPES.index(dtype) + index


def assert_same(got, want, what):
    from tolerances import assert_bitwise

    (g_params, g_bufs), (w_params, w_bufs) = got, want
    for n, a, b in zip(SIZES, g_params, w_params):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: param of {n} elements: {a.dtype} vs {b.dtype}"
        differing = int((a != b).sum())  # the count, for the message; bits decide below
        assert differing == 0, f"{what}: param of {n} elements differs from torch.optim.SGD in {differing} elements"
        assert_bitwise(a, b, f"{what}: param of {n} elements")
    for n, a, b in zip(SIZES, g_bufs, w_bufs):
        assert (a is None) == (b is None), f"{what}: momentum buffer presence differs"
        if a is not None:
            assert_bitwise(a, b, f"{what}: momentum buffer of {n} elements")


def torch_is_fused():
    """torch rounds add(alpha) once only in its AVX2/AVX-512 kernels (see the module docstring)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def requires_fused_torch():
    if not torch_is_fused():
        pytest.skip(f"torch runs its {torch.backends.cpu.get_cpu_capability()} CPU kernels, which do not fuse "
                    "add(alpha): there is no single-rounding torch.optim.SGD to match bit for bit")


def gradfuse_capabilities():
    """The CPU builds of gradfuse this CPU can run (the active one is left as it was)."""
    active, names = torch.ops.gradfuse._cpu_capability(None), []
    try:
        for name in ("default", "avx2", "avx512"):
            try:
                torch.ops.gradfuse._cpu_capability(name)
                names.append(name)
            except RuntimeError:
                pass
    finally:
        torch.ops.gradfuse._cpu_capability(active)
    return names


# ---------------------------------------------------------------- tests

def test_grid_is_the_brief():
    # 8 without momentum (weight_decay x dampening x maximize), 12 with it (weight_decay x
    # {dampening 0, dampening 0.1, nesterov} x maximize).
    assert len(CONFIGS) == 20
    assert all(c["nesterov"] <= (c["momentum"] != 0 and c["dampening"] == 0) for c in CONFIGS)


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[config_id(c) for c in CONFIGS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_identical_to_torch_sgd_every_capability(dtype, index):
    requires_fused_torch()
    config = CONFIGS[index]
    inputs = make_inputs(dtype, seed_of(dtype, index))
    want = run_torch(inputs, config)
    names = gradfuse_capabilities()
    assert "default" in names and ("avx2" in names) == (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
    active = torch.ops.gradfuse._cpu_capability(None)
    try:
        for name in names:
            torch.ops.gradfuse._cpu_capability(name)
            assert_same(run_gradfuse(inputs, config), want, f"{dtype} {config_id(config)} gradfuse {name}")
    finally:
        torch.ops.gradfuse._cpu_capability(active)


def test_old_rounding_would_differ():
    """The grid can see the difference: an update with one rounding per multiply and per add (what
    gradfuse computed before the fused form) differs from torch.optim.SGD on these inputs."""
    requires_fused_torch()
    for dtype in DTYPES:
        config = dict(lr=LR, weight_decay=0.01, momentum=0.9, dampening=0.1)
        inputs = make_inputs(dtype, seed_of(dtype, 0))
        want_params, _ = run_torch(inputs, config)
        start, grads = inputs
        params, bufs = [p.clone() for p in start], [None] * len(start)
        for step_grads in grads:
            for i, g in enumerate(step_grads):
                d = g + (config["weight_decay"] * params[i])  # mul rounded, then the add rounded
                bufs[i] = d.clone() if bufs[i] is None else (0.9 * bufs[i]) + ((1 - 0.1) * d)
                params[i] = params[i] - (LR * bufs[i])
        assert sum(int((a != b).sum()) for a, b in zip(params, want_params)) > 0, dtype


def test_default_capability_in_a_fresh_process_matches_torch(tmp_path):
    """ATEN_CPU_CAPABILITY=default in a fresh process: gradfuse picks its baseline build there, and its
    results equal torch.optim.SGD's (with torch's AVX kernels, from this process) bit for bit."""
    requires_fused_torch()
    inputs = {(str(d), i): make_inputs(d, seed_of(d, i)) for d in DTYPES for i in range(len(CONFIGS))}
    inputs_path, outputs_path = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(inputs, inputs_path)
    env = {k: v for k, v in os.environ.items() if k not in ("GRADFUSE_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    env.update(ATEN_CPU_CAPABILITY="default",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, os.path.abspath(__file__), str(inputs_path), str(outputs_path)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-4000:]
    out = torch.load(outputs_path)
    assert out["gradfuse_capability"] == "default"
    assert out["torch_capability"] == "DEFAULT"
    for (dtype_name, index), got in out["results"].items():
        config = CONFIGS[index]
        want = run_torch(inputs[(dtype_name, index)], config)
        assert_same(got, want, f"{dtype_name} {config_id(config)} gradfuse default (fresh process)")


def fresh_child(inputs_path, outputs_path):
    inputs = torch.load(inputs_path)
    results = {key: run_gradfuse(value, CONFIGS[key[1]]) for key, value in inputs.items()}
    torch.save({"gradfuse_capability": torch.ops.gradfuse._cpu_capability(None),
                "torch_capability": torch.backends.cpu.get_cpu_capability(), "results": results}, outputs_path)


if __name__ == "__main__":
    fresh_child(sys.argv[1], sys.argv[2])
