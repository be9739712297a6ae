"""Where does a FusedAccumSGD step spend its time? cProfile of the Python side and a
torch.profiler op table, for a workload (default: 2000 tiny tensors, K=1, fp32).

    python -m benchmarks.profile_step [--workload tiny2000|gpt2|resnet50] [-K 1] [--steps 50]
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

from . import cases, workloads


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="tiny2000", choices=sorted(workloads.NAMED))
    parser.add_argument("-K", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50, help="cycles to profile")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    shapes = workloads.NAMED[args.workload]()
    benches, keep = cases.cycle_benches(shapes, torch.float32, args.device, args.K, True, 1,
                                        ("gradfuse", "torch_foreach"))
    for name, bench in benches.items():
        for _ in range(3):
            bench.setup(0)
            bench.fn(0)
        # plain timing of the cycle, then the cProfile view
        total = 0.0
        for _ in range(args.steps):
            bench.setup(0)
            t0 = time.perf_counter()
            bench.fn(0)
            total += time.perf_counter() - t0
        print(f"== {name}: {total / args.steps * 1e3:.3f} ms per cycle ({args.workload}, K={args.K})")
        profiler = cProfile.Profile()
        for _ in range(args.steps):
            bench.setup(0)
            profiler.enable()
            bench.fn(0)
            profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(min(args.steps, 10)):
                bench.setup(0)
                bench.fn(0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
