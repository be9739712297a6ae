"""Peak memory of the end-to-end rows: one fresh process per mode (a process's high-water resident set
cannot be shared between modes), measured as benchmarks/peak_memory.py does: the baseline once the
model and the micro-batches exist, the peak (VmHWM reset through /proc/self/clear_refs on CPU,
max_memory_allocated on CUDA) over two updates after the optimizer is built, glibc's mmap threshold
fixed so that freed tensors leave the resident set. Momentum on, as in the timed rows."""
import argparse
import gc
import json
import os
import subprocess
import sys

PROCESS_MODES = ("torch", "gradfuse", "gradfuse_apart", "gradfuse_flat", "gradfuse_backward")


def _peak_one(name, K, mode, quick, device):
    import torch

    from . import e2e_models
    from .e2e_loops import OptimizerClock, make_optimizer, update
    from .peak_memory import high_water_bytes, reset_high_water, resident_bytes

    model, _ = e2e_models.build(name, quick, device)
    params = list(model.parameters())
    data = e2e_models.inputs(name, quick, device, K)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    else:
        base = resident_bytes()
    opt = make_optimizer(mode, model, K)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_high_water()
    for _ in range(2):
        update(mode, model, params, opt, data, OptimizerClock())
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return high_water_bytes() - base


def peaks(specs, quick, device):
    """{label: {mode: peak bytes above model + data}} for specs [(label, model name, K, torch mode)]."""
    out = {label: {} for label, *_ in specs}
    for process_mode in PROCESS_MODES:
        args = [sys.executable, "-m", "benchmarks.e2e_memory", "--device", device, "--mode", process_mode,
                "--specs", json.dumps(specs)] + (["--quick"] if quick else [])
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 << 10))
        done = subprocess.run(args, capture_output=True, text=True, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if done.returncode != 0:  # keep the timings; the row says why memory is missing
            why = done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else f"exit {done.returncode}"
            for label in out:
                out[label][process_mode] = f"error: {why}"
            continue
        for label, peak in json.loads(done.stdout.strip().splitlines()[-1]).items():
            out[label][process_mode] = peak
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--mode", choices=PROCESS_MODES, required=True)
    parser.add_argument("--specs", required=True, help="JSON list of [label, model, K, torch mode]")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = {}
    for label, name, K, torch_mode in json.loads(args.specs):
        result[label] = _peak_one(name, K, torch_mode if args.mode == "torch" else args.mode, args.quick, args.device)
        gc.collect()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
