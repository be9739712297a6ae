"""FusedAccumAdamW vs torch's best equivalent: gradients accumulated into .grad (foreach adds),
clip_grad_norm_(foreach=True), then AdamW(fused=True) or AdamW(foreach=True), the faster.

    python -m benchmarks.adamw_cases --device cpu|cuda [--quick]

Cases: the K=1 step (norm + clip + update) and a full K=4 cycle, clipping on, on the named
workloads. Minimum bytes per element of size e (same dtype throughout): each added micro-batch
reads acc and grad and writes acc (3e), the norm reads A once (e; fused into the last addition
when K > 1), the update reads g, p, m, v and writes p, m, v (7e). run_adamw_cases() returns the
rows for benchmarks/run.py."""
import argparse

import torch

import gradfuse

from . import workloads
from .bytes_model import elem
from .cases import GradSet, _assign, make_params
from .machine import machine_info
from .stability import mark, row_spread, steadiest
from .timing import Bench, last_level_cache_bytes, measure, rotation_sets

LR, MAX_NORM = 1e-4, 1.0
WORKLOADS = ("gpt2", "resnet50", "tiny2000")
TORCH_IMPLS = {"torch_fused": {"fused": True}, "torch_foreach": {"foreach": True}}


def model_bytes(numel, dtype, k):
    e = elem(dtype)
    return numel * ((k - 1) * 3 * e + (e if k == 1 else 0) + 7 * e)


def adamw_benches(shapes, dtype, device, k, n_sets):
    """name -> Bench for one full cycle of K micro-batches (K=1: one step)."""
    sets = [GradSet(shapes, dtype, device, k) for _ in range(n_sets)]
    benches = {}
    states = []
    for _ in range(n_sets):
        params = make_params(shapes, dtype, device)
        states.append((params, gradfuse.FusedAccumAdamW(params, lr=LR, accumulation_steps=k, max_grad_norm=MAX_NORM)))

    def gf_cycle(i):
        params, opt = states[i]
        for j in range(k):
            _assign(params, sets[i].work if j == 0 else sets[i].micro[j])
            opt.step()
    benches["gradfuse"] = Bench(gf_cycle, lambda i: sets[i].restore(), n_sets)

    for name, kwargs in TORCH_IMPLS.items():
        torch_states = []
        for _ in range(n_sets):
            params = make_params(shapes, dtype, device)
            torch_states.append((params, torch.optim.AdamW(params, lr=LR, **kwargs)))

        def cycle(i, states=torch_states):
            params, opt = states[i]
            _assign(params, sets[i].work)
            for j in range(1, k):
                torch._foreach_add_(sets[i].work, sets[i].micro[j])  # what autograd's accumulation does
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            opt.step()
        benches[name] = Bench(cycle, lambda i: sets[i].restore(), n_sets)
    return benches, sets


def run_case(workload, dtype, device, k, quick):
    shapes = workloads.NAMED[workload]()
    numel = workloads.total_params(shapes)
    moved = model_bytes(numel, dtype, k)
    footprint = numel * elem(dtype) * (4 + k)
    n_sets = max(1, min(rotation_sets(footprint, last_level_cache_bytes(device)), 4))
    benches, keepalive = adamw_benches(shapes, dtype, device, k, n_sets)
    timings = measure(benches, device, target_s=0.4 if quick else 1.5, min_reps=5 if quick else 10)
    ours = timings["gradfuse"]
    best = min(TORCH_IMPLS, key=lambda name: timings[name].median_s)
    theirs = timings[best]
    del keepalive
    return dict(kind="adamw", workload=workload, dtype=str(dtype).replace("torch.", ""), K=k, tensors=len(shapes),
                numel=numel, model_bytes=moved, n_sets=n_sets, torch_best=best,
                gradfuse_ms=ours.median_s * 1e3, torch_ms=theirs.median_s * 1e3,
                speedup=theirs.median_s / ours.median_s, gradfuse_gbps=moved / ours.median_s / 1e9,
                gradfuse_iqr_pct=100 * ours.iqr_s / ours.median_s, torch_iqr_pct=100 * theirs.iqr_s / theirs.median_s,
                torch_ms_by_impl={name: timings[name].median_s * 1e3 for name in TORCH_IMPLS})


def run_adamw_cases(device, quick, log=print, remeasure=lambda row: True):
    """Every AdamW row (dicts), logging a table line per case as it finishes; a row over the spread
    bound for which remeasure(row) holds is measured again (benchmarks/stability.py)."""
    rows = []
    log(f"{'workload':10} {'dtype':8} {'K':>2} {'gradfuse ms':>11} {'torch best ms':>13} {'best':>13} "
        f"{'speedup':>8} {'gradfuse GB/s':>13} {'IQR % (gf/torch)':>17}")
    for workload in WORKLOADS:
        for k in (1, 4):
            row = mark(*steadiest(lambda: run_case(workload, torch.float32, device, k, quick), row_spread, remeasure))
            rows.append(row)
            log(f"{row['workload']:10} {row['dtype']:8} {k:2d} {row['gradfuse_ms']:11.3f} {row['torch_ms']:13.3f} "
                f"{row['torch_best']:>13} {row['speedup']:7.2f}x {row['gradfuse_gbps']:13.1f} "
                f"{row['gradfuse_iqr_pct']:8.0f}/{row['torch_iqr_pct']:.0f}"
                f"{' UNSTABLE' if row['steady'] is False else ''}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="shorter timing")
    args = parser.parse_args()
    info = machine_info(args.device)
    print(f"FusedAccumAdamW (max_grad_norm={MAX_NORM}) vs clip_grad_norm_ + AdamW fused/foreach; "
          f"{info.get('gpu_name') or info['cpu_model']}, {info['torch_threads']} threads, torch {info['torch']}, "
          f"gradfuse {info['git_commit'][:7]}")
    run_adamw_cases(args.device, args.quick)


if __name__ == "__main__":
    main()
