"""One timed update of K micro-batches through a real backward (backward, step, zero_grad each), its
interleaved medians and the one-line header naming the machine, shared by the small A/B benchmarks
(hot_norm.py, resident_threshold.py)."""
import statistics
import time

import torch

from . import machine


def timed_update(model, opt, x, k, device):
    """Seconds for k micro-batches of model(x).square().mean(), synchronised on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(k):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(sides, reps, one_update):
    """{side: median ms of one_update(side)}: each of reps rounds times every side once, so all sides
    see the same machine state; the first fifth of the rounds is warm-up."""
    times = {side: [] for side in sides}
    for _ in range(reps):
        for side in sides:
            times[side].append(one_update(side))
    return {side: statistics.median(v[reps // 5:]) * 1e3 for side, v in times.items()}


def header(device, what):
    """'<GPU> | <CPU>, N threads, torch V: what'."""
    info = machine.machine_info(device.type)
    where = info.get("gpu_name") if device.type == "cuda" else f"{info['cpu_model']}, {info['torch_threads']} threads"
    return f"{where}, torch {info['torch']}: {what}"
