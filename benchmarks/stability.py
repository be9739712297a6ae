"""When a timed row is steady enough to judge a target on, and what to do when it is not.

A row's spread is IQR / median of its repetitions, per timed side (benchmarks/timing.py keeps
the quartiles of every timing). A target is judged only on rows whose spread, on every side its
metric uses (gradfuse or gradfuse_flat, and torch's best), is at most SPREAD_BOUND. A row over the
bound is measured again, up to MAX_REMEASURES more times (each attempt interleaves gradfuse and
torch as timing.measure does; run.py re-times the benches it built), and the steadiest attempt is
kept. A target that still rests on a
row over the bound is reported UNSTABLE, never MET or MISS, unless a steady row already misses it
(a worst-of target cannot then be met). Rows saved without quartiles (old result files) have an
unknown spread: they are judged as before and the verdict says "spread unknown".
"""

SPREAD_BOUND = 0.10  # IQR / median; every target row of the reference CPU and H200 runs is under 10%
MAX_REMEASURES = 2  # extra attempts for a row over the bound; beyond that the noise is the machine's

MET, MISS, UNSTABLE, NOT_MEASURED = "MET", "MISS", "UNSTABLE", "n/a"


def timing_spread(timing):
    """IQR / median of one timing dict (timing.Timing.to_dict()), None when it lacks them."""
    if not isinstance(timing, dict) or timing.get("iqr_s") is None or not timing.get("median_s"):
        return None
    return timing["iqr_s"] / timing["median_s"]


def side_spreads(row):
    """name -> spread of every timed side of a row; {} when the row keeps no timings."""
    if "results" in row:  # run.py rows: one timing per implementation
        return {name: timing_spread(res.get("timing")) for name, res in row["results"].items()}
    out = {}
    for side in ("gradfuse", "torch"):  # clip_cases / adamw_cases rows: IQR in percent per side
        if row.get(f"{side}_iqr_pct") is not None:
            out[side] = row[f"{side}_iqr_pct"] / 100
    return out


def metric_sides(row, metric):
    """The timed sides a target metric is computed from."""
    if "results" not in row:
        return ["gradfuse", "torch"]
    torch_side = [row["torch_best"]] if row.get("torch_best") else []
    if metric == "pct":
        return ["gradfuse"]
    if metric == "speedup_flat":
        return ["gradfuse_flat"] + torch_side
    if metric == "best_speedup":  # the storage mode the metric picked
        flat_wins = (row.get("speedup_flat") or 0.0) > (row.get("speedup") or 0.0)
        return ["gradfuse_flat" if flat_wins else "gradfuse"] + torch_side
    if metric == "headline":  # every side a table shows: what re-measuring must steady
        return [name for name in ("gradfuse", "gradfuse_flat", "gradfuse_backward")
                if name in row["results"]] + torch_side
    return ["gradfuse"] + torch_side


def row_spread(row, metric="headline"):
    """The largest spread over the sides a metric uses; None when any of them is unknown."""
    spreads = side_spreads(row)
    values = [spreads.get(side) for side in metric_sides(row, metric)]
    if not values or any(v is None for v in values):
        return None
    return max(values)


def is_steady(spread, bound=SPREAD_BOUND):
    """True / False, or None for an unknown spread."""
    return None if spread is None else spread <= bound


def judge(entries, threshold, bound=SPREAD_BOUND):
    """Verdict of a worst-of target over (value, spread, label) entries, one per matching row.

    Returns dict(status, value, spread, unstable=[labels], spread_unknown=bool)."""
    entries = [e for e in entries if e[0] is not None]
    if not entries:
        return dict(status=NOT_MEASURED, value=None, spread=None, unstable=[], spread_unknown=False)
    judged = [e for e in entries if is_steady(e[1], bound) is not False]  # steady or unknown
    shaky = [e for e in entries if is_steady(e[1], bound) is False]
    worst_judged = min(judged, key=lambda e: e[0]) if judged else None
    if worst_judged is not None and (worst_judged[0] < threshold or not shaky):
        status = MET if worst_judged[0] >= threshold else MISS
        basis = judged
        value = worst_judged[0]
    else:  # only a shaky row could decide
        status = UNSTABLE
        basis = shaky
        value = min(e[0] for e in entries)
    known = [e[1] for e in basis if e[1] is not None]
    return dict(status=status, value=value, spread=max(known) if known else None,
                unstable=[e[2] for e in shaky], spread_unknown=any(e[1] is None for e in basis))


def timings_spread(timings):
    """Headline spread of a timing.measure() result: the gradfuse sides and torch's fastest side."""
    torch_names = [name for name in timings if name.startswith("torch") and "@" not in name]
    best = min(torch_names, key=lambda name: timings[name].median_s) if torch_names else None
    return row_spread({"results": {name: {"timing": t.to_dict()} for name, t in timings.items()}, "torch_best": best})


def steadiest(run, spread_of, remeasure=lambda result: True, retries=MAX_REMEASURES, bound=SPREAD_BOUND):
    """run() (a measurement: a row, or timings), again up to `retries` times while its spread is over
    the bound and remeasure(result) says it matters. Returns (the steadiest result, every attempt's spread)."""
    best = run()
    attempts = [spread_of(best)]
    while (attempts[-1] is not None and attempts[-1] > bound and len(attempts) <= retries
           and remeasure(best)):
        result = run()
        attempts.append(spread_of(result))
        if attempts[-1] is not None and attempts[-1] < min(a for a in attempts[:-1] if a is not None):
            best = result
    return best, attempts


def mark(row, attempts, bound=SPREAD_BOUND):
    """Records the attempts' spreads on a row and whether its kept (steadiest) attempt is steady."""
    known = [a for a in attempts if a is not None]
    row["attempt_spreads"] = attempts
    row["spread_bound"] = bound
    row["steady"] = is_steady(min(known) if known and len(known) == len(attempts) else None, bound)
    return row
