"""The bandwidth ceiling, measured in the same run as the benchmarks.

GPU: a large device-to-device copy (dst.copy_(src)); bytes = 2 x size.
CPU: a large streaming copy (torch.Tensor.copy_, on torch's thread pool), a triad
a = b + s*c (torch.add(b, c, alpha=s, out=a)) and an in-place a += s*b; bytes = 2x, 3x, 3x size.
The ceiling used for "% of ceiling" is the best of the measured kernels.
"""
import torch

from .timing import Bench, measure


def measure_ceiling(device, size_bytes: int, target_s: float = 1.0, min_reps: int = 5):
    n = size_bytes // 4
    dev = torch.device(device)
    a = torch.empty(n, device=dev)
    b = torch.rand(n, device=dev)
    c = torch.rand(n, device=dev) if dev.type == "cpu" else None
    benches = {"copy": Bench(lambda i: a.copy_(b))}
    if dev.type == "cpu":
        benches["triad"] = Bench(lambda i: torch.add(b, c, alpha=0.5, out=a))
        # In-place read-modify-write (a += s*b): no write-allocate traffic, like the fused
        # passes (which write back lines they read); copy/triad pay a hidden RFO read.
        benches["inplace_axpy"] = Bench(lambda i: a.add_(b, alpha=1e-30))
    timings = measure(benches, device, warmup=2, min_reps=min_reps, max_reps=50, target_s=target_s)
    result = {"size_bytes": n * 4}
    a.copy_(b)
    moved = {"copy": 2 * n * 4, "triad": 3 * n * 4, "inplace_axpy": 3 * n * 4}
    for name, timing in timings.items():
        result[name] = {"bytes": moved[name], "gbps": moved[name] / timing.median_s / 1e9,
                        "gbps_best": moved[name] / timing.min_s / 1e9, "timing": timing.to_dict()}
    result["ceiling_gbps"] = max(result[k]["gbps"] for k in timings)
    result["ceiling_kind"] = max(timings, key=lambda k: result[k]["gbps"])
    del a, b, c
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result
