"""The portable CPU build: one extension runs on any x86-64, picks its AVX2/AVX-512 kernels at run
time and gives the same bits with each of them.

- static: no function outside the AVX2/AVX-512 kernel namespaces contains an AVX instruction, so
  the baseline code (and what the linker shares between builds) runs on any x86-64;
- native: every capability this CPU has gives bit-identical optimizer steps and norms, and
  GRADFUSE_CPU_CAPABILITY / ATEN_CPU_CAPABILITY select (or refuse) a capability;
- emulated: under `qemu-x86_64 -cpu Haswell` (AVX2, no AVX-512) the extension imports, picks AVX2,
  refuses AVX-512 with an error, and its steps match the native run bit for bit.

Run as a script (`python tests/test_portable_build.py INPUTS OUTPUTS CAPABILITY...`), this file is
the emulated child: it runs the workload on INPUTS once per capability and saves the results.
"""
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import torch  # pytest is imported inside the tests: the emulated child runs this file without it

import gradfuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(gradfuse.__file__)))
IS_X86 = platform.machine() in ("x86_64", "AMD64")
# Shapes with vector tails and chunk (16384) crossings, small enough for an emulated CPU.
SHAPES = [(1,), (37,), (1000,), (16384 + 77,), (3, 11001)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def capability(use=None):
    return torch.ops.gradfuse._cpu_capability(use)


def make_inputs(seed=0):
    """Parameters and three micro-batches of gradients per dtype, from integers scaled in float64
    (exactly reproducible without torch's vectorized random math), one 1e30 spike in float32."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for dtype in DTYPES:
        for i, shape in enumerate(SHAPES):
            for name in ("param", "grad0", "grad1", "grad2"):
                ints = torch.randint(-4096, 4096, shape, generator=gen, dtype=torch.int64)
                ints = torch.where(ints == 0, torch.ones_like(ints), ints)
                inputs[f"{dtype}/{i}/{name}"] = (ints.to(torch.float64) * 2.0 ** -9).to(dtype)
    inputs[f"{torch.float32}/4/grad2"].view(-1)[123] = 1e30
    return inputs


def run_workload(inputs):
    """Results (name -> tensor) of a K=1 and a K=2 clipped momentum-SGD run and of the 2- and
    inf-norms of every gradient list: every CPU kernel, every dtype, tails and chunk crossings."""
    out = {}
    for dtype in DTYPES:
        for k in (1, 2):
            params = [inputs[f"{dtype}/{i}/param"].clone().requires_grad_() for i in range(len(SHAPES))]
            groups = [dict(params=params[:2], momentum=0.9, dampening=0.1, weight_decay=0.01),
                      dict(params=params[2:], momentum=0.5, nesterov=True)]
            opt = gradfuse.FusedAccumSGD(groups, lr=0.1, accumulation_steps=k, max_grad_norm=1.0)
            for step in range(2 * k):
                for i, p in enumerate(params):
                    p.grad = inputs[f"{dtype}/{i}/grad{step % 3}"].clone()
                opt.step()
                opt.zero_grad()
                if opt.micro_step == 0:
                    out[f"{dtype}/K{k}/norm{step}"] = opt.last_grad_norm.clone()
            for i, p in enumerate(params):
                out[f"{dtype}/K{k}/param{i}"] = p.detach().clone()
                out[f"{dtype}/K{k}/momentum{i}"] = opt.state[p]["momentum_buffer"].clone()
        for amsgrad in (False, True):  # the AdamW kernel, K=2, clipped
            params = [inputs[f"{dtype}/{i}/param"].clone().requires_grad_() for i in range(len(SHAPES))]
            opt = gradfuse.FusedAccumAdamW(params, lr=0.01, amsgrad=amsgrad, accumulation_steps=2, max_grad_norm=1.0)
            for step in range(4):
                for i, p in enumerate(params):
                    p.grad = inputs[f"{dtype}/{i}/grad{step % 3}"].clone()
                opt.step()
                opt.zero_grad()
            for i, p in enumerate(params):
                out[f"{dtype}/adamw{amsgrad}/param{i}"] = p.detach().clone()
                out[f"{dtype}/adamw{amsgrad}/exp_avg_sq{i}"] = opt.state[p]["exp_avg_sq"].clone()
        grads = [inputs[f"{dtype}/{i}/grad1"] for i in range(len(SHAPES))]
        for norm_type in (2.0, float("inf")):
            out[f"{dtype}/global_norm/{norm_type}"] = torch.ops.gradfuse.global_norm(grads, norm_type)
    return out


def run_per_capability(inputs, names):
    results = {}
    try:
        for name in names:
            capability(name)
            results[name] = run_workload(inputs)
    finally:
        capability(names[0])
    return results


def assert_same_bits(expected, actual, what):
    from tolerances import assert_bitwise

    assert expected.keys() == actual.keys()
    for key in expected:
        assert_bitwise(actual[key], expected[key], f"{what}: {key}")


def usable_capabilities():
    names = []
    for name in ("default", "avx2", "avx512"):
        try:
            capability(name)
            names.append(name)
        except RuntimeError:
            pass
    capability(names[0])
    return names


# ---------------------------------------------------------------- static: AVX only in kernel builds

def test_avx_instructions_only_in_avx_kernel_namespaces():
    import pytest

    objdump = shutil.which("objdump")
    if not IS_X86 or objdump is None:
        pytest.skip("needs x86-64 and objdump (binutils)")
    library = gradfuse._C.__file__
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", library], capture_output=True,
                             text=True, check=True).stdout
    allowed = ("gradfuse::cpu::AVX2::", "gradfuse::cpu::AVX512::")
    offenders, avx_kernels = {}, set()
    function = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        fields = line.split("\t")
        if function is None or len(fields) < 2 or not fields[1].strip():
            continue
        # VEX/EVEX-encoded instructions all start with "v" (vaddps, vcvtph2ps, vfmadd...).
        if fields[1].split()[0].startswith("v") or "%ymm" in line or "%zmm" in line:
            if function.startswith(allowed):
                avx_kernels.add(function.split("(")[0])
            else:
                offenders.setdefault(function, line.strip())
    assert not offenders, ("AVX instructions outside the per-capability kernels would crash a CPU without "
                           f"them: {dict(list(offenders.items())[:5])}")
    # The scan sees the kernels it allows (it is not vacuous).
    for name in ("AVX2::norm_chunk", "AVX512::norm_chunk", "AVX512::sgd_chunk", "AVX2::accumulate_chunk"):
        assert f"gradfuse::cpu::{name}" in avx_kernels


# ---------------------------------------------------------------- native: every capability, same bits

def test_every_capability_gives_the_same_bits():
    names = usable_capabilities()
    assert names[0] == "default"
    if IS_X86:
        assert "avx2" in names or "avx2" not in open("/proc/cpuinfo").read()
    inputs = make_inputs()
    results = run_per_capability(inputs, names)
    for name in names[1:]:
        assert_same_bits(results["default"], results[name], f"{name} vs default")


def _capability_in_subprocess(env_updates):
    env = {k: v for k, v in os.environ.items() if k not in ("GRADFUSE_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    env.update(PYTHONPATH=ROOT, **env_updates)
    code = "import gradfuse, torch; print(torch.ops.gradfuse._cpu_capability())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_environment_selects_or_refuses_a_capability():
    forced = _capability_in_subprocess({"GRADFUSE_CPU_CAPABILITY": "default"})
    assert forced.returncode == 0 and forced.stdout.split()[-1] == "default", forced.stderr
    capped = _capability_in_subprocess({"ATEN_CPU_CAPABILITY": "default"})
    assert capped.returncode == 0 and capped.stdout.split()[-1] == "default", capped.stderr
    bogus = _capability_in_subprocess({"GRADFUSE_CPU_CAPABILITY": "sse9"})
    assert bogus.returncode != 0
    assert "GRADFUSE_CPU_CAPABILITY='sse9' is not a CPU capability; use default, avx2 or avx512" in bogus.stderr


# ---------------------------------------------------------------- emulated: a Haswell CPU (AVX2, no AVX-512)

def test_emulated_haswell_imports_and_matches_native_bits(tmp_path):
    import pytest

    qemu = shutil.which("qemu-x86_64") or shutil.which("qemu-x86_64-static")
    if not IS_X86:
        pytest.skip("the emulation test targets x86-64 builds")
    if qemu is None:
        pytest.skip("qemu-x86_64 not installed (Debian: apt-get install -y qemu-user); "
                    "it emulates a CPU without AVX-512 to prove the build portable")
    names = usable_capabilities()
    if "avx512" not in names:
        pytest.skip("this CPU has no AVX-512: the native run is already a non-AVX-512 run")
    inputs = make_inputs()
    inputs_path, outputs_path = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(inputs, inputs_path)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("GRADFUSE_CPU_CAPABILITY", None)
    env.pop("ATEN_CPU_CAPABILITY", None)
    started = time.perf_counter()
    child = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, os.path.abspath(__file__),
                            str(inputs_path), str(outputs_path), "avx2", "default"],
                           capture_output=True, text=True, env=env, timeout=900)
    elapsed = time.perf_counter() - started
    assert child.returncode == 0, f"emulated run failed (rc {child.returncode}):\n{child.stderr[-3000:]}"
    emulated = torch.load(outputs_path)
    assert emulated["chosen"] == "avx2"
    assert "this CPU lacks its instructions" in emulated["avx512_refused"]
    native = run_per_capability(inputs, ["default"])["default"]
    for name in ("avx2", "default"):
        assert_same_bits(native, emulated["results"][name], f"emulated Haswell {name} vs native")
    print(f"emulated Haswell run: {elapsed:.0f} s")


def emulated_child(inputs_path, outputs_path, names):
    """Runs in the emulated CPU: records the capability chosen, that AVX-512 is refused, and the
    workload's results per capability."""
    torch.set_num_threads(1)
    chosen = capability()
    try:
        capability("avx512")
        refused = ""
    except RuntimeError as error:
        refused = str(error)
    inputs = torch.load(inputs_path)
    torch.save({"chosen": chosen, "avx512_refused": refused, "results": run_per_capability(inputs, names)},
               outputs_path)


if __name__ == "__main__":
    emulated_child(sys.argv[1], sys.argv[2], sys.argv[3:])
