"""The standalone clip: gradfuse.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_(foreach=True),
max_norm=1.0, 2-norm, on the named workloads (GPT-2 small, ResNet-50, 2000 tiny tensors).

    python -m benchmarks.clip_cases --device cpu|cuda [--quick]

Both run on the same gradients, timed interleaved by timing.measure; each call scales the
gradients in place (both always multiply, even by 1, so the work does not depend on the values).
Model bytes per gradient element: a norm pass reads it once, the scaling reads and writes it:
3 x the element size. run_clip_cases() returns the rows for benchmarks/run.py."""
import argparse

import torch

import gradfuse

from . import workloads
from .bytes_model import elem
from .machine import machine_info
from .stability import mark, row_spread, steadiest
from .timing import Bench, last_level_cache_bytes, measure, rotation_sets

MAX_NORM = 1.0
WORKLOADS = ("gpt2", "resnet50", "tiny2000")


def gradient_sets(shapes, dtype, device, n_sets):
    """n_sets lists of parameters with random gradients (~1e-3 * N(0, 1)), rotated against the cache."""
    sets = []
    for _ in range(n_sets):
        params = [torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, device=device) * 1e-3).to(dtype)
        sets.append(params)
    return sets


def clip_benches(sets):
    return {
        "gradfuse": Bench(fn=lambda i: gradfuse.clip_grad_norm_(sets[i], MAX_NORM), n_sets=len(sets)),
        "torch": Bench(fn=lambda i: torch.nn.utils.clip_grad_norm_(sets[i], MAX_NORM, foreach=True),
                       n_sets=len(sets)),
    }


def run_case(workload, dtype, device, quick):
    shapes = workloads.NAMED[workload]()
    numel = workloads.total_params(shapes)
    model_bytes = 3 * numel * elem(dtype)
    n_sets = max(1, min(rotation_sets(numel * elem(dtype), last_level_cache_bytes(device)), 16))
    sets = gradient_sets(shapes, dtype, device, n_sets)
    timings = measure(clip_benches(sets), device, target_s=0.4 if quick else 1.5, min_reps=5 if quick else 10)
    ours, theirs = timings["gradfuse"], timings["torch"]
    return dict(kind="clip", workload=workload, dtype=str(dtype).replace("torch.", ""), tensors=len(shapes),
                numel=numel, model_bytes=model_bytes, n_sets=n_sets,
                gradfuse_ms=ours.median_s * 1e3, torch_ms=theirs.median_s * 1e3,
                speedup=theirs.median_s / ours.median_s,
                gradfuse_gbps=model_bytes / ours.median_s / 1e9, torch_gbps=model_bytes / theirs.median_s / 1e9,
                gradfuse_iqr_pct=100 * ours.iqr_s / ours.median_s, torch_iqr_pct=100 * theirs.iqr_s / theirs.median_s,
                timings={"gradfuse": ours.to_dict(), "torch": theirs.to_dict()})


def run_clip_cases(device, quick, log=print, remeasure=lambda row: True):
    """Every clip row (dicts), logging a table line per case as it finishes; a row over the spread
    bound for which remeasure(row) holds is measured again (benchmarks/stability.py)."""
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    rows = []
    log(f"{'workload':10} {'dtype':9} {'gradfuse ms':>11} {'torch ms':>9} {'speedup':>8} {'gradfuse GB/s':>13} "
        f"{'torch GB/s':>10} {'IQR % (gf/torch)':>17}")
    for workload in WORKLOADS:
        for dtype in dtypes:
            row = mark(*steadiest(lambda: run_case(workload, dtype, device, quick), row_spread, remeasure))
            rows.append(row)
            log(f"{row['workload']:10} {row['dtype']:9} {row['gradfuse_ms']:11.3f} {row['torch_ms']:9.3f} "
                f"{row['speedup']:7.2f}x {row['gradfuse_gbps']:13.1f} {row['torch_gbps']:10.1f} "
                f"{row['gradfuse_iqr_pct']:8.0f}/{row['torch_iqr_pct']:.0f}"
                f"{' UNSTABLE' if row['steady'] is False else ''}")
            del row["timings"]["gradfuse"]["samples_s"], row["timings"]["torch"]["samples_s"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="float32 only, shorter timing")
    args = parser.parse_args()
    info = machine_info(args.device)
    print(f"clip_grad_norm_ (max_norm={MAX_NORM}, 2-norm): gradfuse vs torch foreach; "
          f"{info.get('gpu_name') or info['cpu_model']}, {info['torch_threads']} threads, torch {info['torch']}, "
          f"gradfuse {info['git_commit'][:7]}")
    run_clip_cases(args.device, args.quick)


if __name__ == "__main__":
    main()
