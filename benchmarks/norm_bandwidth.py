"""The CPU 2-norm pass against the read ceiling: `python -m benchmarks.norm_bandwidth [--quick]
[--capability NAME] [--sizes M,M,...]`.

The read ceiling is torch's float32 `x.sum()` on the same number of elements, timed interleaved
with the norms (benchmarks.timing.measure) on the same rotated input sets, so a shared machine's
drift hits both alike. Each norm is `gradfuse.ops.global_norm([x], 2.0)` (float64 squares and
sums) for float32, bfloat16 and float16 storage, once per CPU kernel build this CPU can run
(default / avx2 / avx512, switched with torch.ops.gradfuse._cpu_capability). GB/s = bytes read /
median time; "% ceiling" = norm GB/s / float32 x.sum() GB/s at that size.
"""
import argparse

import torch

import gradfuse

from .machine import machine_info
from .timing import Bench, last_level_cache_bytes, measure, rotation_sets

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CAPABILITIES = ("default", "avx2", "avx512")


def usable_capabilities():
    """The kernel builds this CPU can run, in CAPABILITIES order; the active one stays active."""
    active = torch.ops.gradfuse._cpu_capability()
    usable = []
    for name in CAPABILITIES:
        try:
            torch.ops.gradfuse._cpu_capability(name)
            usable.append(name)
        except RuntimeError:
            pass
    torch.ops.gradfuse._cpu_capability(active)
    return usable


def norm_bench(sets, capability):
    # The switch runs untimed before each repetition (setup), the norm alone is timed.
    return Bench(lambda i: gradfuse.ops.global_norm([sets[i]], 2.0),
                 setup=lambda i: torch.ops.gradfuse._cpu_capability(capability), n_sets=len(sets))


def measure_size(numel, capabilities, llc, target_s, budget_bytes):
    """GB/s of float32 x.sum() (the ceiling), then of each dtype's x.sum() and norms."""
    n_sets = rotation_sets(numel * 4, llc, budget_bytes=budget_bytes)
    base = [torch.randn(numel) for _ in range(n_sets)]
    rows = {}
    for name, dtype in DTYPES.items():
        sets = [x.to(dtype) for x in base]
        benches = {"ceiling": Bench(lambda i: base[i].sum(), n_sets=n_sets),
                   "sum": Bench(lambda i, s=sets: s[i].sum(), n_sets=n_sets)}
        for capability in capabilities:
            benches[capability] = norm_bench(sets, capability)
        timings = measure(benches, "cpu", warmup=2, min_reps=5, max_reps=200, target_s=target_s)
        itemsize = torch.empty((), dtype=dtype).element_size()
        gbps = {key: (numel * (4 if key == "ceiling" else itemsize)) / t.median_s / 1e9
                for key, t in timings.items()}
        rows[name] = dict(gbps=gbps, n_sets=n_sets, iqr={k: t.iqr_s / t.median_s for k, t in timings.items()})
        del sets
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two sizes, shorter timing")
    parser.add_argument("--capability", choices=CAPABILITIES, default=None,
                        help="time only this kernel build (default: every one this CPU runs)")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes in Mi elements (default 1,16,64)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    info = machine_info("cpu")
    active = torch.ops.gradfuse._cpu_capability()
    usable = usable_capabilities()
    capabilities = [args.capability] if args.capability else usable
    if args.capability and args.capability not in usable:
        parser.error(f"--capability {args.capability}: this CPU runs only {', '.join(usable)}")
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([4, 64] if args.quick else [1, 16, 64])
    target_s = 0.3 if args.quick else 1.0
    llc = last_level_cache_bytes("cpu")
    print(f"CPU: {info['cpu_model']} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads, "
          f"last-level cache {llc >> 20} MiB); torch {info['torch']}; gradfuse at {info['git_commit'][:10]}"
          f"{' (dirty)' if info['git_dirty'] else ''}")
    print(f"kernel builds this CPU runs: {', '.join(usable)} (active: {active})")
    print("ceiling = float32 x.sum() read GB/s at the same size; norm = gradfuse.ops.global_norm([x], 2.0); "
          "median of interleaved repetitions over rotated input sets\n")
    header = f"{'elements':>9} {'dtype':>9} {'ceiling':>8} {'x.sum()':>8}" + "".join(
        f" {'norm ' + c:>13} {'%':>5}" for c in capabilities)
    print(header)
    worst = {}
    try:
        for mi in sizes:
            rows = measure_size(mi << 20, capabilities, llc, target_s, budget_bytes=1 << 30)
            for dtype, row in rows.items():
                g = row["gbps"]
                line = f"{str(mi) + 'Mi':>9} {dtype:>9} {g['ceiling']:8.1f} {g['sum']:8.1f}"
                for c in capabilities:
                    pct = 100 * g[c] / g["ceiling"]
                    worst[c] = min(worst.get(c, pct), pct)
                    line += f" {g[c]:13.1f} {pct:5.0f}"
                print(line, flush=True)
    finally:
        torch.ops.gradfuse._cpu_capability(active)
    print("\nlowest % of the ceiling per build: " + ", ".join(f"{c} {p:.0f}%" for c, p in worst.items()))


if __name__ == "__main__":
    main()
