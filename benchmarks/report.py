"""Console table, target checks and markdown rendering - all from the result JSON, so a
saved run can be re-rendered: `python -m benchmarks.report results.json > table.md`."""
import json
import os
import sys

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
    out = []
    rows = result["rows"]
    rule_rows_ = result.get("clip_rows", []) + result.get("adamw_rows", [])
    for label, metric, threshold, sel in TARGETS[result["machine"]["device"]]:
        if sel["kind"] in ("clip", "adamw"):  # rows of clip_cases / adamw_cases: flat speedups
            hits = [r for r in rule_rows_ if all(r.get(k) == v for k, v in sel.items())]
            value = min((r["speedup"] for r in hits), default=None)
            out.append({"target": label, "metric": metric, "threshold": threshold, "value": value,
                        "met": None if value is None else value >= threshold})
            continue
        hits = [r for r in rows if _matches(r, sel)]
        if sel.get("largest") and hits:
            hits = [max(hits, key=lambda r: r["numel"])]
        values = [_metric(r, metric) for r in hits]
        values = [v for v in values if v is not None]
        value = min(values) if values else None
        out.append({"target": label, "metric": metric, "threshold": threshold, "value": value,
                    "met": None if value is None else value >= threshold})
    return out


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
            f"{gf['timing']['iqr_s'] / gf['timing']['median_s'] * 100:.0f}%" if gf else "-",
            f"{res['gradfuse_flat']['timing']['median_s'] * 1e3:.3f} ({r['speedup_flat']:.2f}x)"
            if r.get("speedup_flat") else "-",
        ])
    return out


HEADER = ["workload", "case", "K", "dtype", "gradfuse ms", "torch-best ms", "speedup", "gradfuse GB/s",
          "% ceiling", "IQR/med", "flat_buffers ms (speedup)"]


def render_text(result):
    rows = table_rows(result)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADER)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines += render_rule_tables(result, markdown=False)
    lines.append("")
    lines.append(_ceiling_line(result))
    lines += _host_lines(result)
    lines.append("Targets:")
    for t in result.get("targets") or evaluate_targets(result):
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
    if t["value"] is None:
        return f"[n/a ] {t['target']}: not measured in this run (target >= {t['threshold']})"
    unit = "%" if t["metric"] == "pct" else "x"
    return (f"[{'MET ' if t['met'] else 'MISS'}] {t['target']}: {t['value']:.2f}{unit} "
            f"(target >= {t['threshold']}{unit})")


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
                    f"{row['gradfuse_iqr_pct']:.0f}%/{row['torch_iqr_pct']:.0f}%"])
    return out


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
    for t in result.get("targets") or evaluate_targets(result):
        lines.append(f"- {_target_line(t)}")
    lines += ["", "## Results", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    lines += render_rule_tables(result, markdown=True)
    lines.append("")
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "target_notes", f"{m['device']}.md")
    if os.path.exists(notes):  # the hand-written analysis of missed targets for this device type
        with open(notes) as handle:
            lines += [handle.read()]
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(render_markdown(json.load(f)))
