"""End-to-end training rows: real forward + backward + optimizer updates of three models
(benchmarks/e2e_models.py) where the optimizer is a visible part of the step, gradfuse in its three
modes against torch's best loop (benchmarks/e2e_loops.py), K = 1 and K = 4, clipping and momentum on.

    python -m benchmarks.e2e_cases --device cpu|cuda [--quick] [--models linear8,gpt2blk,tiny2000] [--out FILE]

Per (model, K) row, all five modes are timed interleaved in this process (timing.measure, one
repetition = one update of K micro-batches, the same micro-batches every time: a training loop
keeps its model hot too). Reported per mode: time per update (median and IQR / median), the
optimizer's share of it (time inside the optimizer calls / time of the update; with
accumulate_in_backward the accumulation runs in backward's hooks, so it is not counted there), the
peak memory above model + data (one process per mode, benchmarks/e2e_memory.py) and, once per model
at K = 4, that gradfuse's parameter updates equal torch's (benchmarks/e2e_check.py).

CPU plan (--quick, to stay near 2-3 minutes on a 2-core machine): linear8 with 4 of its 8 layers,
2 GPT-2 blocks on 16 tokens, at least 3 timed updates per mode (full: 9), peak memory for the K=4 rows
only; the numerics check as in the full plan. linear8 holds about 4 GB (full: 8 GB) while it is timed:
five model copies with gradients and momentum. On CPU every fresh 64 MB gradient is page-faulted in
each backward (torch's loop and gradfuse's default mode free .grad every update; flat_buffers keeps
its buffer), which is part of what these rows measure."""
import argparse
import copy
import gc
import json
import sys

import torch

from . import e2e_check, e2e_memory, e2e_models
from .e2e_loops import MODES, TORCH_OPTIONS, OptimizerClock, make_optimizer, update
from .machine import machine_info
from .stability import row_spread
from .timing import Bench, measure

CHECK_K = 4  # the numerics check runs once per model, on the accumulating cycle


def timing_config(device, quick):
    if device == "cuda":
        return dict(warmup=3, min_reps=10, max_reps=200 if quick else 1000, target_s=0.3 if quick else 1.0)
    # 3 warm-up updates: on the 2-core VMs each mode's first 2-3 updates of the 4096-wide model run about
    # 2.4x slower (allocator and page-fault transient, measured in every mode alike), then settle.
    return dict(warmup=3, min_reps=3 if quick else 9, max_reps=30 if quick else 100, target_s=0.5 if quick else 2.0)


def time_modes(name, K, device, quick, tcfg):
    """(timings {mode: Timing}, optimizer seconds {mode: [per timed update]}, data) for one (model, K)."""
    data = e2e_models.inputs(name, quick, device, K)
    benches, clocks, keep = {}, {}, []
    base, _ = e2e_models.build(name, quick, device)
    for mode in MODES:
        model = copy.deepcopy(base)  # same weights in every mode, without re-running the initialisers
        params = list(model.parameters())
        opt = make_optimizer(mode, model, K)
        clocks[mode] = OptimizerClock(device)
        keep.append((model, opt))
        benches[mode] = Bench(lambda i, mode=mode, model=model, params=params, opt=opt:
                              update(mode, model, params, opt, data, clocks[mode]))
    timings = measure(benches, device, **tcfg)
    opt_s = {mode: clocks[mode].seconds(timings[mode].reps) for mode in MODES}
    del benches, keep, base
    gc.collect()
    return timings, opt_s, data


def run_row(name, K, device, quick, tcfg, log):
    shapes, what = e2e_models.build(name, quick, "meta")  # sizes only, without initialising weights
    n_tensors, numel = len(list(shapes.parameters())), sum(p.numel() for p in shapes.parameters())
    timings, opt_s, data = time_modes(name, K, device, quick, tcfg)
    best = min(TORCH_OPTIONS, key=lambda mode: timings[mode].median_s)
    results = {}
    for mode in MODES:
        t = timings[mode]
        results[mode] = {"timing": t.to_dict(), "ms": t.median_s * 1e3, "opt_share": sum(opt_s[mode]) / sum(t.samples_s),
                         "speedup": timings[best].median_s / t.median_s}
    row = dict(kind="e2e", label=f"e2e {name} K{K}", model=name, what=what, K=K, dtype="float32", n_tensors=n_tensors,
               numel=numel, torch_best=best, results=results)
    row["spread"] = row_spread(row)
    if K == CHECK_K:
        row["check"] = e2e_check.check(name, quick, device, data, best)
    log(_line(row))
    return row


def run_e2e_cases(device, quick, log=print, models=tuple(e2e_models.MODELS), ks=(1, 4)):
    """Every end-to-end row (dicts), logging each as it finishes, then the peak memory of each."""
    tcfg = timing_config(device, quick)
    rows = []
    for name in models:
        for K in ks:
            try:
                rows.append(run_row(name, K, device, quick, tcfg, log))
            except Exception as error:  # keep going; the error is reported in the table and JSON
                rows.append(dict(kind="e2e", label=f"e2e {name} K{K}", model=name, K=K,
                                 error=f"{type(error).__name__}: {error}"[:500]))  # tensor reprs can be huge
                log(f"{rows[-1]['label']}: {rows[-1]['error']}")
            gc.collect()
    # quick: peak memory of the accumulating (K=4) rows only, one process per mode either way
    specs = [(r["label"], r["model"], r["K"], r["torch_best"]) for r in rows
             if "error" not in r and not (quick and r["K"] != CHECK_K)]
    memory = e2e_memory.peaks(specs, quick, device) if specs else {}
    for row in rows:
        if row["label"] in memory:
            peaks = memory[row["label"]]
            row["peak_bytes"] = {mode: peaks.get("torch" if mode == row["torch_best"] else mode)
                                 for mode in MODES if not mode.startswith("torch") or mode == row["torch_best"]}
    return rows


def _line(row):
    parts = [f"{mode} {res['ms']:.1f} ms ({100 * res['timing']['iqr_s'] / res['timing']['median_s']:.0f}%, "
             f"opt {100 * res['opt_share']:.0f}%)" for mode, res in row["results"].items()]
    check = row.get("check")
    tail = "" if check is None else f"; check vs {check['against']}: {'ok' if check['ok'] else 'FAILED'}"
    return f"{row['label']}: " + ", ".join(parts) + tail


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the 2-3 minute CPU plan (see above)")
    parser.add_argument("--models", default=",".join(e2e_models.MODELS), help="comma-separated subset")
    parser.add_argument("--k", default="1,4", help="comma-separated K values")
    parser.add_argument("--out", default=None, help="also write the rows and the machine as JSON here")
    args = parser.parse_args()
    from . import e2e_report
    info = machine_info(args.device)
    print(f"end-to-end training rows on {info.get('gpu_name') or info['cpu_model']} ({info['torch_threads']} threads), "
          f"torch {info['torch']}, gradfuse {info['git_commit'][:7]}{' (dirty)' if info['git_dirty'] else ''}, "
          f"{'quick' if args.quick else 'full'} plan", flush=True)
    rows = run_e2e_cases(args.device, args.quick, log=lambda line: print(line, file=sys.stderr, flush=True),
                         models=args.models.split(","), ks=tuple(int(k) for k in args.k.split(",")))
    print("\n".join(e2e_report.render(rows, markdown=False)))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"machine": info, "quick": args.quick, "e2e_rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
