"""Entry point: python -m benchmarks.run --device cpu|cuda [--quick] [--out DIR] [--only SUBSTR|e2e]
[--cuda-graphs] [--rows FILE]. A row a target is judged on whose IQR/median is over
stability.SPREAD_BOUND is measured again (benchmarks/stability.py). --only e2e runs only the
end-to-end training rows (benchmarks/e2e_cases.py). Prints the headline table, writes <out>/results.json (every raw
timing, machine info), <out>/sweep.png and <out>/<machine-tag>.md; a full (non --quick) run with
the default --out also writes benchmarks/results/<machine-tag>.md. --rows appends the ceiling and
every row to FILE as JSON lines as soon as each finishes, so a run stopped early keeps them."""
import argparse
import gc
import json
import os
import sys
import time

import torch

from . import (adamw_cases, bytes_model, cases, clip_cases, e2e_cases, host_overhead, report, stability, step_cases,
               training_cases, workloads)
from .ceiling import measure_ceiling
from .machine import machine_info, machine_tag
from .plot import plot_sweep
from .progress import Progress
from .timing import last_level_cache_bytes, measure, rotation_sets

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Half-precision op rows (CUDA): GB/s of the norm, the accumulation with norm and the momentum update.
HALF_OPS = (("global_norm", "bfloat16"), ("global_norm", "float16"), ("accumulate_norm", "bfloat16"),
            ("accumulate_norm", "float16"), ("sgd_step", "bfloat16"))
CYCLE_IMPLS = ("gradfuse", "gradfuse_flat", "torch_fused", "torch_foreach")
# Step rows also time track_param_norms=True: the same bytes (no extra read of the gradients).
STEP_IMPLS = CYCLE_IMPLS + ("gradfuse_param_norms",)


def build_plan(device, quick):
    """List of case descriptions (dicts); order = run order."""
    plan = []
    sizes = workloads.sweep_sizes(device, quick)
    for n in sizes:
        plan.append(dict(kind="cycle", workload="sweep", numel=n, dtype="float32", K=1, clip=True))
        if not quick:
            plan.append(dict(kind="cycle", workload="sweep", numel=n, dtype="float32", K=4, clip=True))
        for op in (("sgd_step",) if quick else cases.OPS):
            if quick and n != sizes[-1]:
                continue
            plan.append(dict(kind="op", workload="sweep", numel=n, dtype="float32", op=op))
    named = ("gpt2", "resnet50", "tiny2000")
    plan.append(dict(kind="step", workload="tiny64", dtype="float32", K=1, clip=True))
    for wl in named:
        if not (quick and wl == "gpt2"):  # the optimizer's share of a K=1 step, both storage modes
            plan.append(dict(kind="step", workload=wl, dtype="float32", K=1, clip=True))
        for dtype in ("float32", "bfloat16"):
            if quick and (dtype != "float32"):
                continue
            for K in (1, 4):
                if quick and wl == "resnet50" and K == 4:
                    continue
                plan.append(dict(kind="cycle", workload=wl, dtype=dtype, K=K, clip=True))
                if K > 1 and not (quick and wl == "gpt2"):  # quick: keeps the 5-minute budget
                    plan.append(dict(kind="boundary", workload=wl, dtype=dtype, K=K, clip=True))
                if dtype == "float32" and not quick:
                    plan.append(dict(kind="cycle", workload=wl, dtype=dtype, K=K, clip=False))
        # Real autograd (forward, backward, optimizer). Not GPT-2 on CPU: each micro-batch there
        # maps and page-faults fresh 500 MB buffers, whose time swamps the comparison.
        if (not quick or wl == "tiny2000") and not (device == "cpu" and wl == "gpt2"):
            plan.append(dict(kind="train", workload=wl, dtype="float32", K=4, clip=True))
        if not quick or wl == "tiny2000":
            for op in cases.OPS:
                plan.append(dict(kind="op", workload=wl, dtype="float32", op=op))
    if device == "cuda":
        for op, dtype in HALF_OPS:
            plan.append(dict(kind="op", workload="sweep", numel=1 << 26, dtype=dtype, op=op))
        if quick:
            plan.append(dict(kind="cycle", workload="gpt2", dtype="bfloat16", K=1, clip=True))
    if quick:  # a run cut short keeps the named workloads and half-precision rows; the sweep goes last
        plan.sort(key=lambda case: case["workload"] == "sweep" and case["dtype"] == "float32")
    return plan


def shapes_of(case):
    if case["workload"] == "sweep":
        return [(case["numel"],)]
    return workloads.NAMED[case["workload"]]()


def timing_config(device, quick):
    if device == "cuda":
        return dict(warmup=3, min_reps=10 if quick else 20, max_reps=300 if quick else 1000,
                    target_s=0.3 if quick else 1.0)
    return dict(warmup=1, min_reps=3 if quick else 5, max_reps=30 if quick else 200, target_s=0.3 if quick else 2.0)


def run_case(case, device, llc, tcfg, cuda_graphs, ceiling_gbps):
    shapes = shapes_of(case)
    dtype = DTYPES[case["dtype"]]
    n = workloads.total_params(shapes)
    row = dict(case, numel=n, n_tensors=len(shapes))
    budget = (3 << 30) if device == "cpu" else (16 << 30)
    if case["kind"] == "op":
        touch = n * 4 * 5
        n_sets = max(1, min(rotation_sets(touch, llc), budget // (n * 4 * 9)))
        benches, keep = cases.op_benches(case["op"], shapes, device, n_sets, cuda_graphs, dtype)
        per_param = bytes_model.op_bytes_per_param(case["op"], dtype)
    elif case["kind"] == "step":
        n_sets = max(1, min(rotation_sets(cases.footprint_bytes(shapes, dtype, 1), llc),
                            budget // cases.memory_per_set(shapes, dtype, 1, len(STEP_IMPLS))))
        benches, keep = step_cases.step_benches(shapes, dtype, device, n_sets, STEP_IMPLS)
        per_param = bytes_model.cycle_bytes_per_param(dtype, 1)
    elif case["kind"] == "train":
        per_set = training_cases.bytes_per_set(shapes, dtype, case["K"], len(CYCLE_IMPLS))
        n_sets = max(1, min(rotation_sets(per_set, llc), budget // per_set))
        benches, keep = training_cases.training_benches(shapes, dtype, device, case["K"], n_sets, CYCLE_IMPLS)
        per_param = None  # forward/backward time is in it: no bytes model, no GB/s
    else:
        K = case["K"]
        touch = cases.footprint_bytes(shapes, dtype, K)
        n_sets = max(1, min(rotation_sets(touch, llc), budget // cases.memory_per_set(shapes, dtype, K, 3)))
        benches, keep = cases.cycle_benches(shapes, dtype, device, K, case["clip"], n_sets, CYCLE_IMPLS,
                                            boundary_only=case["kind"] == "boundary")
        per_param = (bytes_model.boundary_bytes_per_param(dtype, K) if case["kind"] == "boundary"
                     else bytes_model.cycle_bytes_per_param(dtype, K))
        row["torch_bytes"] = n * bytes_model.torch_cycle_bytes_per_param(dtype, K, case["clip"]) \
            if case["kind"] == "cycle" else None
    row["model_bytes"] = None if per_param is None else n * per_param
    row["model_bytes_per_param"] = per_param
    row["n_sets"] = n_sets
    # A row a target is judged on, over the spread bound, is timed again (benchmarks/stability.py).
    judged = report.feeds_target(dict(row, results={"gradfuse": {}}), device)
    timings, attempts = stability.steadiest(lambda: measure(benches, device, **tcfg), stability.timings_spread,
                                            remeasure=lambda _: judged)
    stability.mark(row, attempts)
    row["results"] = {}
    for name, t in timings.items():
        g = None if per_param is None else bytes_model.gbps(row["model_bytes"], t.median_s)
        row["results"][name] = {"timing": t.to_dict(), "gbps": g,
                                "pct_ceiling": None if g is None else 100 * g / ceiling_gbps}
    torch_names = [k for k in row["results"] if k.startswith("torch") and "@" not in k]
    if torch_names:
        best = min(torch_names, key=lambda k: row["results"][k]["timing"]["median_s"])
        row["torch_best"] = best
        for impl, key in (("gradfuse", "speedup"), ("gradfuse_flat", "speedup_flat"),
                          ("gradfuse_param_norms", "speedup_param_norms")):
            if impl in row["results"]:
                row[key] = row["results"][best]["timing"]["median_s"] / row["results"][impl]["timing"]["median_s"]
    del benches, keep
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="a subset that finishes in minutes")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<machine-tag>/)")
    parser.add_argument("--only", default=None, help="run only cases whose label contains this substring "
                                                      "('e2e': only the end-to-end training rows)")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time the op cases by CUDA graph replay")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--rows", default=None, help="append the ceiling and each finished row to this JSON-lines file")
    parser.add_argument("--no-host", action="store_true", help="skip the host-us-per-step rows")
    parser.add_argument("--resume", default=None,
                        help="a --rows file of an earlier run on the same kind of machine: its finished rows are "
                             "kept (marked resumed) and not measured again")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    started = time.perf_counter()
    torch.manual_seed(0)
    device = args.device
    info = machine_info(device)
    tag = machine_tag(info)
    out = args.out or os.path.join(HERE, "results", tag)
    os.makedirs(out, exist_ok=True)
    tcfg = timing_config(device, args.quick)
    llc = last_level_cache_bytes(device)
    plan = build_plan(device, args.quick)
    if args.only:
        plan = [c for c in plan if args.only in _label(c)]
    progress = Progress(len(plan) + 2, enabled=not args.no_progress)
    progress.step("ceiling")
    # CPU: 256 MiB buffers, or 2x the LLC (up to 1 GiB) so the copy cannot run from cache.
    ceiling_bytes = max(256 << 20, min(2 * llc, 1 << 30)) if device == "cpu" else (1 << 30)
    ceiling = measure_ceiling(device, ceiling_bytes,
                              target_s=tcfg["target_s"], min_reps=tcfg["min_reps"])
    rows_file = open(args.rows, "a") if args.rows else None

    def emit(row):
        if rows_file is not None:
            rows_file.write(json.dumps(row) + "\n")
            rows_file.flush()

    emit(dict(kind="ceiling", ceiling_gbps=ceiling["ceiling_gbps"], ceiling_kind=ceiling["ceiling_kind"],
              machine=info))
    earlier = _resumed_rows(args.resume)
    for row in earlier.values():
        emit(row)
    host = [row for row in earlier.values() if row.get("kind") == "host"]
    if device == "cuda" and not args.no_host and not args.only and not host:  # on CPU a step's host time is its compute
        progress.step("host us per step")
        for row in host_overhead.host_rows(device):
            emit(row)
            host.append(row)
    result = {"machine": info, "machine_tag": tag, "ceiling": ceiling, "rows": [], "host_overhead": host,
              "config": dict(quick=args.quick, timing=tcfg, cuda_graphs=args.cuda_graphs, llc_bytes=llc,
                             lr=cases.LR, momentum=cases.MOMENTUM, max_norm=cases.MAX_NORM, argv=sys.argv)}
    for case in plan:
        progress.step(_label(case))
        if _label(case) in earlier:
            result["rows"].append(earlier[_label(case)])
            continue
        case_start = time.perf_counter()
        try:
            row = run_case(case, device, llc, tcfg, args.cuda_graphs, ceiling["ceiling_gbps"])
        except Exception as error:  # keep going; the error is reported in the table and JSON
            row = dict(case, numel=workloads.total_params(shapes_of(case)), error=f"{type(error).__name__}: {error}")
        row["wall_s"] = time.perf_counter() - case_start  # incl. data generation and warm-up
        row["label"] = _label(case)
        result["rows"].append(row)
        emit(row)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    progress.close()
    if not args.only:  # the standalone clip and AdamW against their torch equivalents, same run
        for key, run_rule in (("clip_rows", clip_cases.run_clip_cases), ("adamw_rows", adamw_cases.run_adamw_cases)):
            result[key] = run_rule(device, args.quick, log=lambda line: print(line, file=sys.stderr),
                                   remeasure=lambda r: report.feeds_target(r, device))
            for row in result[key]:
                emit(row)
    if not args.only or args.only == "e2e":  # real training steps of three models (benchmarks/e2e_cases.py)
        result["e2e_rows"] = e2e_cases.run_e2e_cases(device, args.quick, log=lambda line: print(line, file=sys.stderr))
        for row in result["e2e_rows"]:
            emit(row)
    if rows_file is not None:
        rows_file.close()
    result["targets"] = report.evaluate_targets(result)
    result["wall_s"] = time.perf_counter() - started
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot_sweep(result, os.path.join(out, "sweep.png"))
    except Exception as error:  # matplotlib missing: the JSON still has everything
        print(f"plot skipped: {error}", file=sys.stderr)
    markdown = report.render_markdown(result)
    with open(os.path.join(out, f"{tag}.md"), "w") as f:
        f.write(markdown)
    if not args.quick and args.out is None and not args.only:
        with open(os.path.join(HERE, "results", f"{tag}.md"), "w") as f:
            f.write(markdown)
    print(report.render_text(result))
    print(f"\nwrote {out}/results.json, sweep.png, {tag}.md  ({result['wall_s']:.0f} s)")


def _resumed_rows(path):
    """label -> row of an earlier run's --rows file (rows that finished, errors excluded), each marked
    resumed; {} without a file."""
    rows = {}
    if path is None:
        return rows
    with open(path) as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if "label" in row and "error" not in row and row.get("kind") not in ("ceiling", "clip", "adamw", "e2e"):
                rows[row["label"]] = dict(row, resumed=True)
    return rows


def _label(case):
    parts = [case["workload"]]
    if "numel" in case:
        parts.append(f"{case['numel'] >> 20}M")
    parts.append(case["kind"] if case["kind"] != "op" else f"op:{case['op']}")
    if "K" in case:
        parts.append(f"K{case['K']}")
    parts.append(case["dtype"])
    if case.get("clip") is False:
        parts.append("noclip")
    return " ".join(parts)


if __name__ == "__main__":
    main()
