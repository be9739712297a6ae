#!/usr/bin/env python
"""Exploding gradients in a vanilla tanh RNN: plain SGD diverges, FusedAccumSGD keeps training.

Task: a single-layer tanh RNN (nn.RNN) reads a sequence of T (default 100) scalars
x_t ~ N(0, 1) and must output, at every time step, the normalised sum of the last W inputs
    y_t = (x_t + x_{t-1} + ... + x_{t-W+1}) / sqrt(W),   Var(y_t) = 1,
so predicting 0 scores MSE 1.0. The loss is back-propagated through all T steps.

Two runs start from the same initial weights and see the same micro-batches in the same order:

* plain:    torch.optim.SGD(lr, momentum), manual accumulation of K micro-batches
            ((loss / K).backward() each micro-batch, opt.step() every K-th), no clipping;
* gradfuse: gradfuse.FusedAccumSGD(lr, momentum, accumulation_steps=K, max_grad_norm=1.0),
            loss.backward() + opt.step() every micro-batch (it averages the K gradients itself).

So both see the same effective batch (K micro-batches averaged) and the same learning rate; the
only difference is the global-norm clipping (and the skip of non-finite cycles). With the default
learning rate the occasional gradient spikes of the recurrent net throw plain SGD's weights off,
its loss grows by tens of orders of magnitude and turns inf / NaN, while the clipped run trains.

Once plain SGD's parameters are non-finite they stay so (NaN propagates through SGD and
momentum), so from then on its loss is recorded as NaN without running its forward/backward.

Exit status: 0 when the gradfuse run trained (finite final loss, held-out loss at most half the
initial one), whatever plain SGD did; 1 otherwise.

    python examples/exploding_gradients.py                  # ~400 optimizer steps, CPU: well under a minute
    python examples/exploding_gradients.py --steps 200 --device cpu --plot /tmp/eg.png --json /tmp/eg.json
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradfuse import FusedAccumSGD

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (each = K micro-batches)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lr", type=float, default=0.25, help="learning rate, the same for both runs")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum, the same for both runs")
    p.add_argument("--accumulation-steps", "-K", type=int, default=4, dest="accum")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradfuse clipping threshold")
    p.add_argument("--micro-batch", type=int, default=32, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=100, help="sequence length T (BPTT length)")
    p.add_argument("--window", type=int, default=4, help="W: the target sums the last W inputs")
    p.add_argument("--hidden", type=int, default=32, help="RNN hidden size")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the data stream")
    p.add_argument("--log-every", type=int, default=25, help="print a table row every N steps")
    p.add_argument("--eval-size", type=int, default=512, help="held-out sequences for the initial/final eval")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU, which is fastest for this tiny model)")
    p.add_argument("--plot", default=os.path.join(HERE, "exploding_gradients.png"), help="PNG output ('' = none)")
    p.add_argument("--json", default=os.path.join(HERE, "exploding_gradients.json"), help="JSON output ('' = none)")
    return p.parse_args(argv)


class SeqRegressor(nn.Module):
    """tanh RNN + linear read-out at every time step."""

    def __init__(self, hidden):
        super().__init__()
        self.rnn = nn.RNN(1, hidden, batch_first=True, nonlinearity="tanh")
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():  # orthogonal recurrent matrix: the usual init for long-range RNNs
            nn.init.orthogonal_(self.rnn.weight_hh_l0)

    def forward(self, x):  # x: (B, T, 1) -> (B, T)
        h, _ = self.rnn(x)
        return self.head(h).squeeze(-1)


def make_batch(gen, batch, seq_len, window, device):
    """Inputs (B, T, 1) and targets (B, T), y_t = sum of x_{t-window+1..t} / sqrt(window). The
    window-1 values before t=0 are random too (never shown to the model); seq_loss skips those steps."""
    raw = torch.randn(batch, seq_len + window - 1, generator=gen)
    x = raw[:, window - 1:]
    y = raw.unfold(1, window, 1).sum(-1) / math.sqrt(window)
    return x.unsqueeze(-1).to(device), y.to(device)


def seq_loss(pred, y, window):
    # The first window-1 targets depend on inputs before t=0 that the model never sees.
    return F.mse_loss(pred[:, window - 1:], y[:, window - 1:])


def all_finite(module):
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def grad_norm(module):
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


@torch.no_grad()
def evaluate(model, data, window):
    x, y = data
    return float(seq_loss(model(x), y, window))


def fmt(v):
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.2e}"


def finite_or_none(v):
    return v if (v is not None and math.isfinite(v)) else None


def json_value(v):
    """JSON has no NaN/inf: store them as strings so the curves stay lossless and strict-JSON."""
    if v is None or math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def save_plot(path, hist, args, diverged_at):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = hist["step"]
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [3, 2]})

    def finite_xy(ys):
        pts = [(s, v) for s, v in zip(steps, ys) if v is not None and math.isfinite(v) and v > 0]
        return [s for s, _ in pts], [v for _, v in pts]

    px, py = finite_xy(hist["loss_plain"])
    gx, gy = finite_xy(hist["loss_gradfuse"])
    ax.plot(px, py, color="tab:red", lw=1.2, label="torch.optim.SGD (no clipping)")
    ax.plot(gx, gy, color="tab:blue", lw=1.2,
            label=f"gradfuse.FusedAccumSGD (max_grad_norm={args.max_grad_norm})")
    ax.axhline(1.0, color="gray", ls=":", lw=1, label="predict-zero baseline (MSE 1)")
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    top = hi * 10
    bad = [(s, v) for s, v in zip(steps, hist["loss_plain"]) if v is None or not math.isfinite(v)]
    if bad:
        nan_s = [s for s, v in bad if v is None or math.isnan(v)]
        inf_s = [s for s, v in bad if v is not None and math.isinf(v)]
        if inf_s:
            ax.scatter(inf_s, [top] * len(inf_s), marker="^", color="darkred", s=18, zorder=5,
                       label=f"SGD loss = inf ({len(inf_s)} steps)")
        if nan_s:
            ax.scatter(nan_s, [top] * len(nan_s), marker="x", color="tab:red", s=14, zorder=5,
                       label=f"SGD loss = NaN ({len(nan_s)} steps)")
        ax.set_ylim(lo, top * 10)
    if diverged_at is not None:
        for a in (ax, axn):
            a.axvline(diverged_at, color="tab:red", ls="--", lw=0.8, alpha=0.6)
        ax.annotate(f"SGD non-finite from step {diverged_at}", (diverged_at, top), xytext=(6, -16),
                    textcoords="offset points", color="tab:red", fontsize=9)
    ax.set_ylabel("training loss (MSE, mean of K micro-batches)")
    ax.set_title(f"tanh RNN, T={args.seq_len}, lr={args.lr}, momentum={args.momentum}, "
                 f"K={args.accum} x {args.micro_batch} seqs, seed {args.seed}")
    ax.legend(loc="center right", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)

    nx, ny = finite_xy(hist["gnorm_plain"])
    mx, my = finite_xy(hist["gnorm_gradfuse"])
    axn.plot(nx, ny, color="tab:red", lw=1, label="SGD grad norm")
    axn.plot(mx, my, color="tab:blue", lw=1, label="gradfuse last_grad_norm (pre-clip)")
    axn.axhline(args.max_grad_norm, color="k", ls="--", lw=0.8, label="max_grad_norm")
    axn.set_yscale("log")
    axn.set_xlabel("optimizer step")
    axn.set_ylabel("global grad norm")
    axn.legend(loc="upper right", fontsize=8)
    axn.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    K = args.accum

    torch.manual_seed(args.seed)
    plain = SeqRegressor(args.hidden).to(device)
    fused = SeqRegressor(args.hidden).to(device)
    fused.load_state_dict(plain.state_dict())  # identical initial weights

    opt_plain = torch.optim.SGD(plain.parameters(), lr=args.lr, momentum=args.momentum)
    opt_fused = FusedAccumSGD(fused.parameters(), lr=args.lr, momentum=args.momentum,
                              accumulation_steps=K, max_grad_norm=args.max_grad_norm)

    data_gen = torch.Generator().manual_seed(args.seed + 1)
    eval_data = make_batch(torch.Generator().manual_seed(args.seed + 2), args.eval_size, args.seq_len,
                           args.window, device)
    eval0 = evaluate(fused, eval_data, args.window)

    hist = {k: [] for k in ("step", "loss_plain", "loss_gradfuse", "gnorm_plain", "gnorm_gradfuse",
                            "skipped_gradfuse")}
    plain_alive, diverged_at = True, None

    print(f"device={device}  tanh RNN hidden={args.hidden}  T={args.seq_len}  lr={args.lr}  "
          f"momentum={args.momentum}  K={args.accum} x micro-batch {args.micro_batch}  "
          f"max_grad_norm={args.max_grad_norm}")
    print(f"initial held-out loss {eval0:.4f} (predict-zero baseline 1.0)")
    header = f"{'step':>6} | {'loss SGD':>10} | {'loss gradfuse':>13} | {'|g| SGD':>9} | {'|g| gradfuse':>12} | {'skipped':>7}"
    print(header)
    print("-" * len(header))

    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss_p = torch.zeros((), device=device)
        loss_f = torch.zeros((), device=device)
        for _ in range(K):
            x, y = make_batch(data_gen, args.micro_batch, args.seq_len, args.window, device)
            if plain_alive:
                lp = seq_loss(plain(x), y, args.window)
                (lp / K).backward()  # manual accumulation: the mean gradient of the K micro-batches
                loss_p += lp.detach() / K
            lf = seq_loss(fused(x), y, args.window)
            lf.backward()  # FusedAccumSGD averages the K micro-batch gradients itself
            opt_fused.step()  # accumulates; every K-th call clips the mean and updates
            opt_fused.zero_grad()
            loss_f += lf.detach() / K

        if plain_alive:
            gn_p = grad_norm(plain)
            opt_plain.step()
            opt_plain.zero_grad()
            lp_val = float(loss_p)
            if not all_finite(plain):
                plain_alive = False  # NaN/inf weights stay non-finite under SGD: nothing left to train
                diverged_at = step if diverged_at is None else diverged_at
            if not math.isfinite(lp_val) and diverged_at is None:
                diverged_at = step
        else:
            gn_p, lp_val = float("nan"), float("nan")

        lf_val = float(loss_f)
        gn_f = float(opt_fused.last_grad_norm)
        skipped = int(opt_fused.skipped_steps)
        for key, v in zip(hist, (step, lp_val, lf_val, gn_p, gn_f, skipped)):
            hist[key].append(v)
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"{step:>6} | {fmt(lp_val):>10} | {fmt(lf_val):>13} | {fmt(gn_p):>9} | {fmt(gn_f):>12} | "
                  f"{skipped:>7}")
    elapsed = time.perf_counter() - t0

    tail = max(1, args.steps // 10)
    final_f = sum(hist["loss_gradfuse"][-tail:]) / tail
    first_f = hist["loss_gradfuse"][0]
    eval_f = evaluate(fused, eval_data, args.window)
    eval_p = evaluate(plain, eval_data, args.window) if plain_alive else float("nan")
    tail_p = hist["loss_plain"][-tail:]
    final_p = sum(tail_p) / tail if all(math.isfinite(v) for v in tail_p) else float("nan")
    max_p = max((v for v in hist["loss_plain"] if math.isfinite(v)), default=float("nan"))

    print("-" * len(header))
    print(f"training time {elapsed:.1f}s for {args.steps} steps x {K} micro-batches ({device})")
    if diverged_at is not None:
        print(f"plain SGD   : DIVERGED, loss non-finite from step {diverged_at} "
              f"(largest finite loss {fmt(max_p)}); final held-out loss {fmt(eval_p)}")
    else:
        print(f"plain SGD   : did not diverge (largest loss {fmt(max_p)}); mean loss of the last {tail} steps "
              f"{fmt(final_p)}, held-out {fmt(eval_p)}")
    print(f"gradfuse    : loss {fmt(first_f)} (step 1) -> {fmt(final_f)} (mean of the last {tail} steps); "
          f"held-out {eval0:.4f} -> {fmt(eval_f)}; skipped cycles {int(opt_fused.skipped_steps)}; "
          f"cycles clipped {sum(g > args.max_grad_norm for g in hist['gnorm_gradfuse'])}/{args.steps}")

    summary = {
        "plain_diverged": diverged_at is not None, "plain_diverged_at_step": diverged_at,
        "plain_max_finite_loss": finite_or_none(max_p), "plain_final_eval_loss": finite_or_none(eval_p),
        "gradfuse_initial_eval_loss": eval0, "gradfuse_final_eval_loss": finite_or_none(eval_f),
        "gradfuse_final_train_loss": finite_or_none(final_f),
        "gradfuse_skipped_steps": int(opt_fused.skipped_steps), "train_seconds": elapsed,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k not in ("plot", "json")} |
                       {"device": str(device), "torch": torch.__version__},
                       "summary": summary,
                       "curves": {k: [json_value(v) for v in vs] for k, vs in hist.items()}}, f, indent=1)
        print(f"curves      : {args.json}")
    if args.plot:
        save_plot(args.plot, hist, args, diverged_at)
        print(f"plot        : {args.plot}")

    # Self-check of the gradfuse run (plain SGD's divergence is the expected outcome, not an error).
    problems = []
    if not (math.isfinite(final_f) and math.isfinite(eval_f)):
        problems.append("gradfuse ended with a non-finite loss")
    elif not eval_f <= 0.5 * eval0:
        problems.append(f"gradfuse did not train: held-out loss {eval0:.4f} -> {eval_f:.4f} (needs <= half)")
    elif not final_f < first_f:
        problems.append(f"gradfuse training loss did not decrease ({first_f:.4f} -> {final_f:.4f})")
    if not all_finite(fused):
        problems.append("gradfuse parameters are non-finite")
    if problems:
        print("SELF-CHECK FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("self-check  : OK (gradfuse run finite and improved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
