"""Console table, target checks and markdown rendering - all from the result JSON, so a
saved run can be re-rendered: `python -m benchmarks.report results.json > table.md`."""
import json
import os
import sys

from . import e2e_report, stability

TARGETS = {
    "cpu": [
        ("boundary (K=1) GPT-2 fp32 vs torch (a)", "speedup", 1.8,
         dict(kind="cycle", workload="gpt2", K=1, dtype="float32", clip=True)),
        ("full K=4 cycle GPT-2 fp32 vs torch (a)", "speedup", 1.25,
         dict(kind="cycle", workload="gpt2", K=4, dtype="float32", clip=True)),
        ("2000 tiny tensors (K=1) vs torch (a)", "speedup", 20.0,
         dict(kind="cycle", workload="tiny2000", K=1, dtype="float32", clip=True)),
        ("2000 tiny tensors (64-512), optimizer step (K=1), flat_buffers=True vs torch", "speedup_flat", 20.0,
         dict(kind="step", workload="tiny2000", K=1, dtype="float32", clip=True)),
        ("2000 tensors of 64, optimizer step (K=1), flat_buffers=True vs torch", "speedup_flat", 20.0,
         dict(kind="step", workload="tiny64", K=1, dtype="float32", clip=True)),
        ("K=4 cycles (every workload, clip or not), faster storage mode vs torch (worst)", "best_speedup", 1.0,
         dict(kind="cycle", K=4)),
        ("update pass (clipped_sgd_step_, largest sweep size) % of ceiling", "pct", 80.0,
         dict(kind="op", workload="sweep", op="sgd_step", largest=True)),
        ("standalone clip GPT-2 fp32 vs torch foreach", "speedup", 1.5, dict(kind="clip", workload="gpt2",
                                                                              dtype="float32")),
        ("standalone clip 2000 tiny fp32 vs torch foreach", "speedup", 5.0, dict(kind="clip", workload="tiny2000",
                                                                                  dtype="float32")),
        ("AdamW boundary (K=1) GPT-2 fp32 vs torch best", "speedup", 1.3, dict(kind="adamw", workload="gpt2", K=1,
                                                                                dtype="float32")),
    ],
    "cuda": [
        ("boundary (K=1, 24 B/param) % of copy BW at >= 64M params (worst size)", "pct", 85.0,
         dict(kind="cycle", workload="sweep", K=1, dtype="float32", clip=True, min_numel=64 << 20)),
        ("boundary (K=1) GPT-2 fp32 vs torch (a)", "speedup", 1.3,
         dict(kind="cycle", workload="gpt2", K=1, dtype="float32", clip=True)),
        ("full K=4 cycle GPT-2 fp32 vs torch (a)", "speedup", 1.3,
         dict(kind="cycle", workload="gpt2", K=4, dtype="float32", clip=True)),
        ("2000 tiny tensors (K=1) vs torch (a)", "speedup", 5.0,
         dict(kind="cycle", workload="tiny2000", K=1, dtype="float32", clip=True)),
    ],
}


def _matches(row, sel):
    for key in ("kind", "workload", "K", "dtype", "clip", "op"):
        if key in sel and row.get(key) != sel[key]:
            return False
    if "min_numel" in sel and row["numel"] < sel["min_numel"]:
        return False
    return "error" not in row and "gradfuse" in row.get("results", {})


def evaluate_targets(result):
    """One verdict per target of the device: MET / MISS on steady rows, UNSTABLE when only a row over
    stability.SPREAD_BOUND could decide it, n/a when nothing matched (benchmarks/stability.py)."""
    out = []
    rows = result["rows"]
    rule_rows_ = result.get("clip_rows", []) + result.get("adamw_rows", [])
    for label, metric, threshold, sel in TARGETS[result["machine"]["device"]]:
        hits = target_rows(rows, rule_rows_, sel)
        entries = [(_metric(r, metric), stability.row_spread(r, metric), _row_name(r)) for r in hits]
        verdict = stability.judge(entries, threshold)
        attempts = [len(r["attempt_spreads"]) - 1 for r in hits if "attempt_spreads" in r]
        out.append({"target": label, "metric": metric, "threshold": threshold, "value": verdict["value"],
                    "met": {stability.MET: True, stability.MISS: False}.get(verdict["status"]),
                    "status": verdict["status"], "spread": verdict["spread"], "spread_bound": stability.SPREAD_BOUND,
                    "spread_unknown": verdict["spread_unknown"], "unstable_rows": verdict["unstable"],
                    "remeasures": max(attempts) if attempts else None})
    return out


def target_rows(rows, rule_rows_, sel):
    """The rows a target selector picks: run.py rows, or clip_cases / adamw_cases rows."""
    if sel["kind"] in ("clip", "adamw"):
        return [r for r in rule_rows_ if all(r.get(k) == v for k, v in sel.items())]
    hits = [r for r in rows if _matches(r, sel)]
    if sel.get("largest") and hits:
        hits = [max(hits, key=lambda r: r["numel"])]
    return hits


def feeds_target(row, device):
    """Whether some target of the device is judged on this row (those rows are re-measured when shaky)."""
    for _, _, _, sel in TARGETS[device]:
        if sel["kind"] in ("clip", "adamw"):
            if all(row.get(k) == v for k, v in sel.items()):
                return True
        elif _matches(row, {k: v for k, v in sel.items() if k != "largest"}):
            return True
    return False


def targets_of(result):
    """The run's stored verdicts, or fresh ones for a result file saved before verdicts had a status."""
    stored = result.get("targets")
    if stored and all("status" in t for t in stored):
        return stored
    return evaluate_targets(result)


def _row_name(row):
    return row.get("label") or " ".join(str(row.get(k)) for k in ("kind", "workload", "dtype", "K") if k in row)


def _metric(row, metric):
    if metric == "pct":
        return row["results"]["gradfuse"]["pct_ceiling"]
    if metric == "best_speedup":  # the user picks the storage mode: the better of the two
        return max(row.get("speedup") or 0.0, row.get("speedup_flat") or 0.0) or None
    return row.get(metric)


def _fmt_n(n):
    return f"{n / (1 << 20):.0f}M" if n >= 1 << 20 else f"{n / 1e3:.0f}K"


def table_rows(result):
    """Rows of the headline table (list of lists of strings)."""
    out = []
    for r in result["rows"]:
        label = r["workload"] if r["workload"] != "sweep" else f"sweep {_fmt_n(r['numel'])}"
        what = r["kind"] if r["kind"] != "op" else f"op {r['op']}"
        if r["kind"] != "op" and not r.get("clip", True):
            what += " (no clip)"
        if "error" in r:
            out.append([label, what, str(r.get("K", "-")), r["dtype"].replace("float", "fp"), "error", r["error"][:60], "", "", "", "", ""])
            continue
        res = r["results"]
        gf = res.get("gradfuse")
        best = r.get("torch_best")
        out.append([
            label, what, str(r.get("K", "-")) if r["kind"] != "op" else "-", r["dtype"].replace("float", "fp"),
            f"{gf['timing']['median_s'] * 1e3:.3f}" if gf else "-",
            f"{res[best]['timing']['median_s'] * 1e3:.3f} ({best.replace('torch_', '')})" if best else "-",
            f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
            f"{gf['gbps']:.1f}" if gf and gf["gbps"] is not None else "-",
            f"{gf['pct_ceiling']:.0f}%" if gf and gf["pct_ceiling"] is not None else "-",
            _spread_cell(r),
            f"{res['gradfuse_flat']['timing']['median_s'] * 1e3:.3f} ({r['speedup_flat']:.2f}x)"
            if r.get("speedup_flat") else "-",
        ])
    return out


HEADER = ["workload", "case", "K", "dtype", "gradfuse ms", "torch-best ms", "speedup", "gradfuse GB/s",
          "% ceiling", "IQR/med (gf/flat/torch)", "flat_buffers ms (speedup)"]


def _pct(spread):
    return "?" if spread is None else f"{100 * spread:.0f}%"


def _spread_cell(row):
    """IQR / median of the sides the table shows, flagged when over the bound (the row is not judged)."""
    spreads = stability.side_spreads(row)
    sides = stability.metric_sides(row, "headline")
    cell = "/".join(_pct(spreads.get(side)) for side in sides) or "-"
    worst = stability.row_spread(row)
    if worst is None:
        return cell + " (spread unknown)"
    if not stability.is_steady(worst):
        return cell + " UNSTABLE" + (f" after {len(row['attempt_spreads'])} runs" if "attempt_spreads" in row else "")
    return cell


def render_text(result):
    rows = table_rows(result)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADER)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines += render_rule_tables(result, markdown=False)
    lines += e2e_report.render(result.get("e2e_rows"), markdown=False)
    lines.append("")
    lines.append(_ceiling_line(result))
    lines += _host_lines(result)
    lines.append(f"Targets (judged only on rows with IQR/median <= {100 * stability.SPREAD_BOUND:.0f}%, "
                 f"a row over it re-measured up to {stability.MAX_REMEASURES} times, else UNSTABLE):")
    for t in targets_of(result):
        lines.append("  " + _target_line(t))
    return "\n".join(lines)


def _host_lines(result):
    """Host us per step (benchmarks/host_overhead.py), one line per workload."""
    lines = []
    for row in result.get("host_overhead") or []:
        parts = [f"{name} {us:.1f} us" for name, us in row["host_us_per_step"].items()]
        lines.append(f"Host time per step, {row['workload']} ({row['n_tensors']} tensors): " + ", ".join(parts))
    return lines


def _ceiling_line(result):
    c = result["ceiling"]
    parts = [f"{k} {c[k]['gbps']:.1f} GB/s" for k in ("copy", "triad", "inplace_axpy") if k in c]
    return (f"Ceiling ({c['size_bytes'] >> 20} MiB buffers): " + ", ".join(parts) +
            f" -> ceiling {c['ceiling_gbps']:.1f} GB/s ({c['ceiling_kind']})")


def _target_line(t):
    status = t.get("status") or {True: stability.MET, False: stability.MISS}.get(t.get("met"), stability.NOT_MEASURED)
    if t["value"] is None:
        return f"[n/a ] {t['target']}: not measured in this run (target >= {t['threshold']})"
    unit = "%" if t["metric"] == "pct" else "x"
    bound = f"{100 * t.get('spread_bound', stability.SPREAD_BOUND):.0f}%"
    if status == stability.UNSTABLE:
        runs = f" after {t['remeasures']} re-measure(s)" if t.get("remeasures") is not None else ""
        return (f"[UNSTABLE] {t['target']}: {t['value']:.2f}{unit} not judged (target >= {t['threshold']}{unit}): "
                f"IQR/median {_pct(t.get('spread'))} > {bound}{runs}; rows: {', '.join(t.get('unstable_rows', []))}")
    if t.get("spread_unknown") or "spread" not in t:
        spread = "spread unknown"
    else:
        spread = f"IQR/median {_pct(t['spread'])} <= {bound}"
    return (f"[{status.ljust(4)}] {t['target']}: {t['value']:.2f}{unit} "
            f"(target >= {t['threshold']}{unit}; {spread})")


RULE_HEADER = ["workload", "case", "dtype", "gradfuse ms", "torch ms", "torch", "speedup", "gradfuse GB/s",
               "% ceiling", "IQR (gf/torch)"]


def rule_rows(result):
    """The standalone clip and FusedAccumAdamW rows (benchmarks/clip_cases.py, adamw_cases.py)."""
    ceiling = result["ceiling"]["ceiling_gbps"]
    out = []
    for row in result.get("clip_rows", []) + result.get("adamw_rows", []):
        case = "clip_grad_norm_" if row["kind"] == "clip" else f"AdamW K={row['K']}" + (" step" if row["K"] == 1
                                                                                        else " cycle")
        theirs = "foreach" if row["kind"] == "clip" else row["torch_best"].replace("torch_", "")
        out.append([row["workload"], case, row["dtype"], f"{row['gradfuse_ms']:.3f}", f"{row['torch_ms']:.3f}", theirs,
                    f"{row['speedup']:.2f}x", f"{row['gradfuse_gbps']:.1f}", f"{100 * row['gradfuse_gbps'] / ceiling:.0f}%",
                    _rule_spread_cell(row)])
    return out


def _rule_spread_cell(row):
    spreads = stability.side_spreads(row)
    cell = f"{_pct(spreads.get('gradfuse'))}/{_pct(spreads.get('torch'))}"
    worst = stability.row_spread(row)
    if worst is None:
        return cell + " (spread unknown)"
    return cell if stability.is_steady(worst) else cell + " UNSTABLE"


def render_rule_tables(result, markdown):
    rows = rule_rows(result)
    if not rows:
        return []
    if markdown:
        return ["", "## Standalone clip and AdamW", "", "| " + " | ".join(RULE_HEADER) + " |",
                "|" + "---|" * len(RULE_HEADER)] + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(RULE_HEADER)]
    return ["", "  ".join(h.ljust(w) for h, w in zip(RULE_HEADER, widths))] + [
        "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]


def render_markdown(result):
    m = result["machine"]
    dev = m.get("gpu_name", m["cpu_model"])
    lines = [f"# gradfuse benchmarks: {dev}", "",
             f"- date: {m['date']}; device: {m['device']}; torch {m['torch']} (CUDA {m['torch_cuda']}); "
             f"threads: {m['torch_threads']}; gradfuse {m['gradfuse']} @ {m['git_commit'][:10]}"
             f"{' (dirty)' if m.get('git_dirty') else ''}",
             f"- mode: {'quick' if result['config']['quick'] else 'full'}; wall time {result.get('wall_s', 0):.0f} s; "
             f"LLC {m['llc_bytes'] >> 20} MiB" + (f"; driver {m['driver']}" if m.get("driver") else ""),
             f"- {_ceiling_line(result)}"] + [f"- {line}" for line in _host_lines(result)] + [
             "- speedup = torch-best median / gradfuse median; torch-best = faster of SGD(fused=True) and "
             "SGD(foreach=True) (ops: the torch equivalent); GB/s = model bytes (benchmarks/bytes_model.py) / "
             "median time; % ceiling against the ceiling above.",
             "- cycle = all K micro-steps incl. the boundary; boundary = the last micro-step alone "
             "(for K=1 the cycle is the boundary); step = the optimizer calls of a K=1 step alone (clip, "
             "step, zero_grad), gradients put in place untimed (benchmarks/step_cases.py); flat_buffers = "
             "FusedAccumSGD(flat_buffers=True), whose cycle rows include autograd's in-place add per tensor "
             "(benchmarks/cases.py); train = a K-micro-batch cycle with real forward and "
             "backward passes (autograd's own accumulation into .grad for torch; see "
             "benchmarks/training_cases.py): no bytes model, so no GB/s.", "",
             "## Targets", ""]
    lines.append(f"Judged only on rows whose IQR/median is at most {100 * stability.SPREAD_BOUND:.0f}% on every side "
                 f"the metric uses; a row over it is re-measured up to {stability.MAX_REMEASURES} times (interleaved), "
                 "and a target left resting on it is UNSTABLE (benchmarks/stability.py).")
    lines.append("")
    for t in targets_of(result):
        lines.append(f"- {_target_line(t)}")
    lines += ["", "## Results", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    lines += render_rule_tables(result, markdown=True)
    lines += e2e_report.render(result.get("e2e_rows"), markdown=True)
    lines.append("")
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "target_notes", f"{m['device']}.md")
    if os.path.exists(notes):  # the hand-written analysis of missed targets for this device type
        with open(notes) as handle:
            lines += [handle.read()]
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(render_markdown(json.load(f)))
