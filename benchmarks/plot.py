"""GB/s vs size for the big-tensor sweep (K=1 boundary and the update op), gradfuse vs
torch baselines, with the measured ceiling(s) as horizontal lines."""


def plot_sweep(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series = [("cycle", 1, None, "boundary K=1", "-"), ("cycle", 4, None, "cycle K=4", "--"),
              ("op", None, "sgd_step", "update op", ":")]
    styles = {"gradfuse": ("tab:blue", "o"), "torch_fused": ("tab:orange", "s"), "torch_foreach": ("tab:green", "^")}
    for kind, K, op, label, line in series:
        rows = [r for r in result["rows"] if r["workload"] == "sweep" and r["kind"] == kind and "error" not in r
                and (K is None or r.get("K") == K) and (op is None or r.get("op") == op) and r.get("clip", True)
                and r["dtype"] == "float32"]
        if not rows:
            continue
        rows.sort(key=lambda r: r["numel"])
        for impl, (color, marker) in styles.items():
            pts = [(r["numel"], r["results"][impl]["gbps"]) for r in rows if impl in r["results"]]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, linestyle=line, marker=marker, color=color, label=f"{impl} {label}",
                        alpha=0.95 if impl == "gradfuse" else 0.6)
    c = result["ceiling"]
    styles = {"copy": ("k", ":"), "triad": ("grey", "-."), "inplace_axpy": ("k", "-")}
    for k, (color, line) in styles.items():
        if k in c:  # the solid line is the ceiling the % column uses when it is the in-place one
            used = " (the ceiling used)" if k == c.get("ceiling_kind") else ""
            ax.axhline(c[k]["gbps"], color=color, linestyle=line, linewidth=1,
                       label=f"measured {k} ceiling {c[k]['gbps']:.1f} GB/s{used}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("parameters (one tensor, fp32)")
    ax.set_ylabel("achieved GB/s (model bytes / median time)")
    m = result["machine"]
    ax.set_title(f"gradfuse vs torch: {m.get('gpu_name', m['cpu_model'])} ({m['torch_threads']} threads)", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
