"""Peak memory of an open accumulation cycle under DistributedDataParallel (2 ranks, gloo, CPU), as
benchmarks/peak_memory.py measures it alone: torch's loop (no_sync() for micro-batches 1..K-1,
autograd adds into .grad, clip_grad_norm_, SGD), gradfuse's default mode (the running sums in .grad
under no_sync()) and the default with sum_in_grad=False (each micro-batch's .grad apart from the
sums). Each mode runs in its own pair of processes; each rank reports its high-water resident set
above the baseline taken after DDP is built (DDP's buckets are allocated by then; their pages count
once written).

    python -m benchmarks.peak_memory_ddp [--layers 8 --width 1024 --k 4]"""
import argparse
import contextlib
import json
import os
import sys
import tempfile

MODES = ("torch", "gradfuse", "gradfuse_apart")


def _rank(rank, store, mode, layers, width, k, bucket_view, out):
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradfuse
    from benchmarks.peak_memory import high_water_bytes, reset_high_water, resident_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = DDP(nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]),
                    gradient_as_bucket_view=bucket_view)
        x = torch.randn(8, width)
        base = resident_bytes()
        if mode == "torch":
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        else:
            opt = gradfuse.FusedAccumSGD(model.parameters(), lr=1e-3, accumulation_steps=k, max_grad_norm=1.0,
                                         sum_in_grad=mode == "gradfuse")
        reset_high_water()
        for step in range(2 * k):
            last = (step + 1) % k == 0
            with contextlib.nullcontext() if last else model.no_sync():
                (model(x).square().mean() / (k if mode == "torch" else 1)).backward()
            if mode != "torch":
                opt.step()
                opt.zero_grad()
            elif last:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
        with open(f"{out}.{rank}", "w") as handle:
            json.dump({"peak_bytes": high_water_bytes() - base}, handle)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_all(layers, width, k, bucket_view=False):
    """{mode: the larger of the two ranks' peaks above baseline, in bytes}, each mode in fresh processes."""
    import torch.multiprocessing as mp
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 << 10)  # as peak_memory.py: freed tensors leave the resident set
    peaks = {}
    for mode in MODES:
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "peak")
            mp.spawn(_rank, args=("file://" + os.path.join(folder, "store"), mode, layers, width, k, bucket_view, out),
                     nprocs=2)
            peaks[mode] = max(_read_peak(f"{out}.{rank}") for rank in range(2))
    return peaks


def _read_peak(path):
    with open(path) as handle:
        return json.load(handle)["peak_bytes"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--bucket-view", action="store_true", help="DDP(gradient_as_bucket_view=True)")
    args = parser.parse_args()
    from .machine import machine_info
    param_bytes = args.layers * args.width * args.width * 4
    peaks = run_all(args.layers, args.width, args.k, args.bucket_view)
    print(f"peak memory per rank above model + DDP(gradient_as_bucket_view={args.bucket_view}), 2 ranks (gloo), "
          f"{args.layers} x Linear({args.width}) fp32 "
          f"({param_bytes / 2**20:.0f} MiB of parameters), K={args.k}, {machine_info('cpu')['cpu_model']}")
    for mode, peak in peaks.items():
        print(f"{mode:16} {peak / 2**20:8.0f} MiB  ({peak / param_bytes:.2f} x parameter bytes)")


if __name__ == "__main__":
    sys.exit(main())
