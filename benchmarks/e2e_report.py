"""The end-to-end rows' table (benchmarks/e2e_cases.py), for the console and the markdown report:
one line per (model, K, mode) with time per update, its IQR / median (UNSTABLE over the bound), the
optimizer's share, the speedup against torch's best loop, the peak memory and the numerics check."""
from . import stability

HEADER = ["model", "K", "mode", "ms / update", "IQR/med", "optimizer share", "vs torch best", "peak MiB", "check"]


def _peak(row, mode):
    peak = (row.get("peak_bytes") or {}).get(mode)
    if peak is None:
        return "-"
    return peak if isinstance(peak, str) else f"{peak / 2**20:.0f}"


def _check(row, mode):
    check = row.get("check")
    if check is None:
        return "-"
    if mode not in check["max_err"]:
        return "reference" if mode == check["against"] else "-"
    err = check["max_err"][mode]  # worst difference in units of the tolerance
    return f"{'ok' if err <= 1.0 else 'FAILED'} ({err:.2f} of tol)"


def _spread(timing):
    spread = stability.timing_spread(timing)
    if spread is None:
        return "? (spread unknown)"
    return f"{100 * spread:.0f}%" + ("" if stability.is_steady(spread) else " UNSTABLE")


def table(rows):
    out = []
    for row in rows or []:
        if "error" in row:
            out.append([row["model"], str(row["K"]), "error", row["error"][:60], "", "", "", "", ""])
            continue
        for mode, res in row["results"].items():
            best = mode == row["torch_best"]
            out.append([row["model"], str(row["K"]), mode + (" (best)" if best else ""), f"{res['ms']:.2f}",
                        _spread(res["timing"]), f"{100 * res['opt_share']:.0f}%",
                        f"{res['speedup']:.2f}x", _peak(row, mode), _check(row, mode)])
    return out


def _notes(rows):
    """What each model is, and whether the check's step clipped (pre-clip norm above max_norm)."""
    chosen = {}
    for row in rows:  # one note per model, from its checked row where there is one
        if "error" not in row and (row["model"] not in chosen or "check" in row):
            chosen[row["model"]] = row
    lines = []
    for row in chosen.values():
        check = row.get("check")
        norm = "" if not check or check["grad_norm"] is None else (
            f"; check: {check['updates']} updates at K={row['K']}, lr {check['lr']}, pre-clip norm "
            f"{check['grad_norm']:.3g}, tolerance {check['ulps']} ulps + {check['rtol']:.0e} x the largest update "
            f"({check['max_update']:.2g})")
        lines.append(f"{row['model']}: {row['what']}, {row['n_tensors']} tensors, "
                     f"{row['numel'] / 1e6:.2f}M parameters{norm}")
    return lines


def render(rows, markdown):
    body = table(rows)
    if not body:
        return []
    intro = ("End-to-end training (real forward + backward, SGD momentum 0.9, clip 1.0; time per update of K "
             "micro-batches; optimizer share = time inside the optimizer calls / update time; peak = above "
             f"model + data, one process per mode; rows over IQR/median {100 * stability.SPREAD_BOUND:.0f}% are "
             "UNSTABLE)")
    notes = _notes(rows)
    if markdown:
        return (["", "## End-to-end training steps", "", intro + ".", ""] + [f"- {n}" for n in notes] +
                ["", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)] +
                ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(HEADER)]
    return (["", intro + ":"] + ["  " + n for n in notes] + ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths))] +
            ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body])
