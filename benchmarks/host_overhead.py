"""Host microseconds per optimizer step: the time step() takes to return (launches queued, no
synchronisation), for 6, 148 (GPT-2 small) and 2000 tensors, gradfuse vs torch's best fused
recipe (clip_grad_norm_(foreach=True) + SGD(fused=True)). K = 1 with clipping and momentum, so
every step is a boundary step. On CUDA each repetition starts with an empty launch queue (a
synchronisation outside the timed call), so a full queue never makes the host wait."""
import statistics
import time

import torch

import gradfuse

from . import cases, workloads

WORKLOADS = ("small6", "gpt2", "tiny2000")


def _step_fns(shapes, dtype, device):
    grads = cases._randn(shapes, dtype, device, 1e-3)
    gf_params = cases.make_params(shapes, dtype, device)
    gf_opt = gradfuse.FusedAccumSGD(gf_params, lr=cases.LR, momentum=cases.MOMENTUM, max_grad_norm=cases.MAX_NORM)
    t_params = cases.make_params(shapes, dtype, device)
    fused = torch.device(device).type == "cuda"
    t_opt = torch.optim.SGD(t_params, lr=cases.LR, momentum=cases.MOMENTUM, **({"fused": True} if fused else {"foreach": True}))

    def gradfuse_step():
        for p, g in zip(gf_params, grads):
            p.grad = g  # K = 1: adopted and only read
        gf_opt.step()

    def torch_step():
        for p, g in zip(t_params, grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(t_params, cases.MAX_NORM, foreach=True)  # scales g in place: values shrink, shapes stay
        t_opt.step()

    return {"gradfuse": gradfuse_step, "torch_fused" if fused else "torch_foreach": torch_step}


def host_rows(device, reps=50, warmup=5):
    """One row per workload: median / quartiles of the host time of one step() call, in us."""
    rows = []
    for workload in WORKLOADS:
        shapes = workloads.NAMED[workload]()
        fns = _step_fns(shapes, torch.float32, device)
        row = {"kind": "host", "label": f"{workload} host us/step K1 float32", "workload": workload,
               "n_tensors": len(shapes), "numel": workloads.total_params(shapes), "host_us_per_step": {},
               "host_us_quartiles": {}}
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e6)
                if torch.device(device).type == "cuda":
                    torch.cuda.synchronize()  # outside the timed call: the queue starts empty each time
            q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
            row["host_us_per_step"][name] = median
            row["host_us_quartiles"][name] = [q1, q3]
        rows.append(row)
    return rows
