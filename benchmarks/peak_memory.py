"""Peak memory of an open accumulation cycle: torch's loop (autograd adds into .grad), gradfuse's
default mode (the running sums stay in .grad: autograd adds into them, as in torch's loop), the
default with sum_in_grad=False (accumulators + each micro-batch's .grad), accumulate_in_backward=True
(accumulators + about one layer's gradient) and flat_buffers=True (autograd adds into the flat
gradient buffer, which exists from construction on, like a .grad that is never freed).

    python -m benchmarks.peak_memory --device cpu|cuda [--layers 8 --width 2048 --k 4]

Each mode runs in its own process. The baseline is taken once the model and data exist, before
the optimizer is built; the peak counts from after the optimizer is built (flat_buffers=True
copies the parameters then, a one-time transient that is not part of a cycle). On CPU the peak is
the process's high-water resident set (VmHWM, reset through /proc/self/clear_refs) minus the
baseline; on CUDA torch's max_memory_allocated (reset) minus the baseline. Momentum-free SGD, so the optimizer
holds nothing but its accumulators. glibc's mmap threshold is fixed for the measured processes:
its default moves up after a large free, after which freed tensors stay resident in the heap and
the resident set no longer tracks live memory."""
import argparse
import json
import os
import resource
import subprocess
import sys

MODES = ("torch", "gradfuse", "gradfuse_apart", "gradfuse_backward", "gradfuse_flat")


def resident_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def reset_high_water():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident set


def high_water_bytes():
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure_mode(mode, device, layers, width, k):
    """Runs two full cycles of one mode in this process; returns its peak above the baseline in bytes."""
    import torch
    from torch import nn

    import gradfuse

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)
    x = torch.randn(8, width, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    else:
        base = resident_bytes()
    if mode == "torch":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    else:
        opt = gradfuse.FusedAccumSGD(model.parameters(), lr=1e-3, accumulation_steps=k, max_grad_norm=1.0,
                                     accumulate_in_backward=mode == "gradfuse_backward",
                                     flat_buffers=mode == "gradfuse_flat", sum_in_grad=mode != "gradfuse_apart")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_high_water()
    for step in range(2 * k):
        (model(x).square().mean() / (k if mode == "torch" else 1)).backward()
        if mode == "torch":
            if (step + 1) % k == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
        else:
            opt.step()
            opt.zero_grad()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return high_water_bytes() - base


def run_all(device, layers, width, k):
    """{mode: peak bytes above baseline}, each mode in a fresh process."""
    peaks = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, "-m", "benchmarks.peak_memory", "--one", mode, "--device", device,
                              "--layers", str(layers), "--width", str(width), "--k", str(k)],
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 << 10)))
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    return peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps({"peak_bytes": measure_mode(args.one, args.device, args.layers, args.width, args.k)}))
        return
    param_bytes = args.layers * args.width * args.width * 4
    peaks = run_all(args.device, args.layers, args.width, args.k)
    print(f"peak memory above model + data, {args.layers} x Linear({args.width}) fp32 ({param_bytes / 2**20:.0f} MiB "
          f"of parameters), K={args.k}, {args.device}")
    for mode, peak in peaks.items():
        print(f"{mode:18} {peak / 2**20:8.0f} MiB  ({peak / param_bytes:.2f} x parameter bytes)")


if __name__ == "__main__":
    main()
