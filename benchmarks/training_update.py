"""One timed update of K micro-batches through a real backward (backward, step, zero_grad each), and
the one-line header naming the machine, shared by the small interleaved A/B benchmarks
(hot_norm.py, resident_threshold.py)."""
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


def header(device, what):
    """'<GPU> | <CPU>, N threads, torch V: what'."""
    info = machine.machine_info(device.type)
    where = info.get("gpu_name") if device.type == "cuda" else f"{info['cpu_model']}, {info['torch_threads']} threads"
    return f"{where}, torch {info['torch']}: {what}"
