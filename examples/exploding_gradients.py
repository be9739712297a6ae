#!/usr/bin/env python
"""Exploding gradients in a vanilla tanh RNN: plain SGD diverges; gradfuse's fixed clipping, ZClip and SpikeSkip.

Task: a single-layer tanh RNN (nn.RNN) reads a sequence of T (default 100) scalars
x_t ~ N(0, 1) and must output, at every time step, the normalised sum of the last W inputs
    y_t = (x_t + x_{t-1} + ... + x_{t-W+1}) / sqrt(W),   Var(y_t) = 1,
so predicting 0 scores MSE 1.0. The loss is back-propagated through all T steps.

Four runs start from the same initial weights and see the same micro-batches in the same order,
at the same learning rate and momentum, K micro-batches per update:

* sgd:       torch.optim.SGD(lr, momentum), manual accumulation ((loss / K).backward() each
             micro-batch, opt.step() every K-th), no clipping;
* fixed:     gradfuse.FusedAccumSGD(lr, momentum, accumulation_steps=K, max_grad_norm=1.0),
             loss.backward() + opt.step() every micro-batch (it averages the K gradients itself);
* zclip:     the same with clip=gradfuse.ZClip() (the zclip package's defaults: z_thresh 2.5,
             alpha 0.97, 25 warm-up cycles clipped at max_grad_norm 1.0, then adaptive);
* spikeskip: the same as fixed plus skip=gradfuse.SpikeSkip(window=128, sigma=6.0), with
             opt.step(loss=loss) on each micro-batch: a cycle whose gradient norm or mean loss is
             more than sigma standard deviations above the last window cycles' is not applied.

Injected data spikes (--spike-steps, --spike-scale): at a few known updates, one micro-batch
(the first of the cycle) is a whole sequence scaled by a large factor (inputs and, since the task
is linear, targets alike): a mis-scaled record. Every run sees it. With the fixed threshold the
spike's step is clipped to norm 1 but still taken in the spike's direction; ZClip clips it to its
running threshold, capped at its max_grad_norm (1.0 by default, so it clips at least as hard as
fixed: in the default run its threshold never drops below the cap and it makes the same updates);
SpikeSkip leaves the weights unchanged. --spike-steps '' disables the spikes.

Recorded per update and run (JSON "curves", the plot, the table): the training loss (mean of the
K micro-batches), the held-out loss (--curve-eval-size fixed sequences), the pre-clip global
gradient norm (gradfuse: opt.last_grad_norm; sgd: computed from .grad before opt.step()), whether
the cycle was clipped and whether it was skipped (opt.last_step_skipped), and the gradient norm of
the layer that explodes, the RNN's recurrent weight weight_hh_l0. The gradfuse runs report
it themselves (track_param_norms=True: opt.param_norms(model)["rnn.weight_hh_l0"], from the fused
norm pass); the demo also computes it from weight_hh_l0.grad before each opt.step() (the gradient the
optimizer sees: the K micro-batch gradients summed, the norm of their mean) and stores the largest
relative difference between the two; for sgd the demo's own value is used. The same
computation over every parameter reproduces opt.last_grad_norm (checked: the largest relative
difference is printed and stored). Whether a ZClip cycle was clipped is likewise computed
by the demo, by replaying opt.last_grad_norm through a separate gradfuse.ZClip with the same
arguments (ZClip.coefficient < 1); for fixed and spikeskip it is norm > max_grad_norm (not skipped).

Once plain SGD's parameters are non-finite they stay so (NaN propagates through SGD and
momentum), so from then on its losses are recorded as NaN without running its forward/backward.

Exit status 0 when: the fixed-threshold gradfuse run trained (finite final loss, held-out loss at
most half the initial one, training loss decreased); the zclip and spikeskip runs ended finite
(losses and parameters); and, when spikes were injected after SpikeSkip's warm-up, spikeskip
skipped at least one of them. 1 otherwise. Plain SGD's divergence is the expected outcome.

    python examples/exploding_gradients.py                  # 300 updates x 4 runs, 1 CPU thread: about 30 s
    python examples/exploding_gradients.py --steps 200 --spike-steps 90,150 --plot /tmp/eg.png --json /tmp/eg.json
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

import gradfuse
from gradfuse import FusedAccumSGD

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ("sgd", "fixed", "zclip", "spikeskip")
COLORS = {"sgd": "tab:red", "fixed": "tab:blue", "zclip": "tab:green", "spikeskip": "tab:purple"}


def int_list(text):
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (each = K micro-batches)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lr", type=float, default=0.25, help="learning rate, the same for every run")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum, the same for every run")
    p.add_argument("--accumulation-steps", "-K", type=int, default=4, dest="accum")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="fixed threshold of the fixed and spikeskip runs; ZClip's cap (its max_grad_norm)")
    p.add_argument("--zclip-z-thresh", type=float, default=2.5, help="ZClip z_thresh (zclip's default)")
    p.add_argument("--zclip-alpha", type=float, default=0.97, help="ZClip alpha (zclip's default)")
    p.add_argument("--zclip-max-grad-norm", default=None,
                   help="ZClip's cap (its max_grad_norm; 'none' = uncapped); default: --max-grad-norm")
    p.add_argument("--skip-window", type=int, default=128, help="SpikeSkip window")
    p.add_argument("--skip-sigma", type=float, default=6.0, help="SpikeSkip sigma")
    p.add_argument("--spike-steps", type=int_list, default=int_list("100,150,200,250"),
                   help="updates whose first micro-batch is scaled by --spike-scale (comma list, '' = none)")
    p.add_argument("--spike-scale", type=float, default=10.0, help="factor of an injected spike's sequence")
    p.add_argument("--micro-batch", type=int, default=32, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=100, help="sequence length T (BPTT length)")
    p.add_argument("--window", type=int, default=4, help="W: the target sums the last W inputs")
    p.add_argument("--hidden", type=int, default=32, help="RNN hidden size")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the data stream")
    p.add_argument("--log-every", type=int, default=25, help="print a table row every N steps (and at spikes)")
    p.add_argument("--eval-size", type=int, default=512, help="held-out sequences for the initial/final eval")
    p.add_argument("--curve-eval-size", type=int, default=64,
                   help="held-out sequences (the first of the eval set) for the per-update held-out loss")
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
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.1e}"


def finite_or_none(v):
    return v if (v is not None and math.isfinite(v)) else None


def json_value(v):
    """JSON has no NaN/inf: store them as strings so the curves stay lossless and strict-JSON."""
    if v is None or isinstance(v, bool) or math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


class Run:
    """One model + optimizer and its per-update records."""
    KEYS = ("loss", "eval_loss", "grad_norm", "hh_grad_norm", "clipped", "skipped")

    def __init__(self, name, label, model, opt, K, zclip_replay=None, pass_loss=False):
        self.name, self.label, self.model, self.opt, self.K = name, label, model, opt, K
        self.gradfuse = name != "sgd"
        self.zclip_replay, self.pass_loss = zclip_replay, pass_loss
        self.alive, self.diverged_at = True, None
        self.hist = {k: [] for k in self.KEYS}
        self.norm_rel_diff = 0.0  # demo's own norm of the mean gradient vs opt.last_grad_norm
        self.hh_rel_diff = 0.0  # demo's own weight_hh_l0 norm vs opt.param_norms() (track_param_norms=True)
        self._new_cycle()

    def _new_cycle(self):
        self.loss_sum = 0.0
        self.grad_sums = [torch.zeros_like(p) for p in self.model.parameters()]  # demo-side copies

    def micro_batch(self, x, y, window):
        if not self.alive:
            return
        loss = seq_loss(self.model(x), y, window)
        self.loss_sum += float(loss.detach())
        if self.gradfuse:
            loss.backward()  # FusedAccumSGD averages the K micro-batch gradients itself
            for s, p in zip(self.grad_sums, self.model.parameters()):
                s.add_(p.grad)  # what the optimizer is about to read
            if self.pass_loss:
                self.opt.step(loss=loss.detach())  # SpikeSkip judges the cycle's mean loss too
            else:
                self.opt.step()  # accumulates; every K-th call clips the mean and updates
            self.opt.zero_grad()
        else:
            (loss / self.K).backward()  # manual accumulation: .grad ends as the mean of the K

    def end_cycle(self, step, max_grad_norm, eval_data, window):
        if not self.alive:
            for k in self.KEYS:
                self.hist[k].append(False if k in ("clipped", "skipped") else float("nan"))
            return
        params = list(self.model.parameters())
        hh_index = next(i for i, (n, _) in enumerate(self.model.named_parameters()) if n == "rnn.weight_hh_l0")
        if self.gradfuse:
            means = [s / self.K for s in self.grad_sums]
        else:
            means = [p.grad.detach().clone() for p in params]
        demo_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double())
                                                                for g in means])))
        hh = float(torch.linalg.vector_norm(means[hh_index].double()))
        clipped = skipped = False
        if self.gradfuse:
            gn = float(self.opt.last_grad_norm)
            skipped = bool(self.opt.last_step_skipped)
            if math.isfinite(gn) and gn > 0:
                self.norm_rel_diff = max(self.norm_rel_diff, abs(demo_norm - gn) / gn)
            if self.opt.last_param_norms is not None:  # gradfuse's own per-parameter norm, from its fused pass
                tracked = self.opt.param_norms(self.model)["rnn.weight_hh_l0"]
                if math.isfinite(tracked) and tracked > 0:
                    self.hh_rel_diff = max(self.hh_rel_diff, abs(hh - tracked) / tracked)
                hh = tracked
            if self.zclip_replay is not None:
                coefficient = float(self.zclip_replay.coefficient(self.opt.last_grad_norm.clone()))
                clipped = not skipped and coefficient < 1.0
            else:
                clipped = not skipped and gn > max_grad_norm
        else:
            gn = demo_norm
            self.opt.step()
            self.opt.zero_grad()
        loss = self.loss_sum / self.K
        if not self.gradfuse and not all_finite(self.model):
            self.alive = False  # NaN/inf weights stay non-finite under SGD: nothing left to train
        if (not self.alive or not math.isfinite(loss)) and self.diverged_at is None:
            self.diverged_at = step
        ev = evaluate(self.model, eval_data, window) if self.alive else float("nan")
        for k, v in zip(self.KEYS, (loss, ev, gn, hh, clipped, skipped)):
            self.hist[k].append(v)
        self._new_cycle()


def same_updates(runs):
    """Whether the zclip run made the fixed run's updates (same curves to 1e-9 relative)."""
    by = {r.name: r for r in runs}
    pairs = [(a, b) for k in ("loss", "grad_norm") for a, b in zip(by["fixed"].hist[k], by["zclip"].hist[k])]
    return all(abs(a - b) <= 1e-9 * max(abs(a), abs(b)) for a, b in pairs if math.isfinite(a) and math.isfinite(b))


def save_plot(path, steps, runs, args, spikes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axn, axh) = plt.subplots(3, 1, figsize=(10, 11), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 2, 2]})

    def finite_xy(ys):
        pts = [(s, v) for s, v in zip(steps, ys) if v is not None and math.isfinite(v) and v > 0]
        return [s for s, _ in pts], [v for _, v in pts]

    def gradfuse_top(key, factor):  # the axis tops follow the gradfuse runs; SGD's blow-up runs off-scale
        vals = [v for r in runs if r.gradfuse for v in r.hist[key] if math.isfinite(v)]
        return max(vals) * factor

    sgd = next(r for r in runs if not r.gradfuse)
    for a in (ax, axn, axh):
        for i, s in enumerate(spikes):
            a.axvline(s, color="orange", lw=5, alpha=0.25, zorder=0,
                      label=f"injected spike (one micro-batch x{args.spike_scale:g})" if i == 0 and a is ax else None)
        if sgd.diverged_at is not None:
            a.axvline(sgd.diverged_at, color="tab:red", ls="--", lw=0.8, alpha=0.6)

    # zclip is drawn dashed over fixed: with ZClip's cap at max_grad_norm the two can coincide.
    style = {r.name: dict(lw=2.6 if r.name == "fixed" else 1.2, ls="--" if r.name == "zclip" else "-") for r in runs}
    same = same_updates(runs)

    # Loss: held-out (solid) and training (thin, faint) per run.
    for r in runs:
        ex, ey = finite_xy(r.hist["eval_loss"])
        tx, ty = finite_xy(r.hist["loss"])
        ax.plot(tx, ty, color=COLORS[r.name], lw=0.6, alpha=0.35)
        ax.plot(ex, ey, color=COLORS[r.name], label=r.label + (" = fixed here" if r.name == "zclip" and same else ""),
                **style[r.name])
    ax.axhline(1.0, color="gray", ls=":", lw=1, label="predict-zero baseline (MSE 1)")
    ax.set_yscale("log")
    top = gradfuse_top("loss", 30)
    lo = min(v for r in runs if r.gradfuse for v in r.hist["eval_loss"] + r.hist["loss"] if v > 0) / 100
    ax.set_ylim(lo, top)
    if sgd.diverged_at is not None:
        max_p = max((v for v in sgd.hist["loss"] if math.isfinite(v)), default=float("nan"))
        ax.annotate(f"SGD off-scale: loss up to {fmt(max_p)}, non-finite from step {sgd.diverged_at}",
                    (sgd.diverged_at, top), xytext=(6, -14), textcoords="offset points", color="tab:red", fontsize=9)
    ax.set_ylabel("loss (MSE): held-out solid, training faint")
    ax.set_title(f"tanh RNN, T={args.seq_len}, lr={args.lr}, momentum={args.momentum}, "
                 f"K={args.accum} x {args.micro_batch} seqs, seed {args.seed}")
    ax.legend(loc="lower left", fontsize=8, ncol=2)
    ax.grid(True, which="major", alpha=0.3)

    # Global pre-clip norm, skipped and clipped cycles marked.
    for r in runs:
        nx, ny = finite_xy(r.hist["grad_norm"])
        axn.plot(nx, ny, color=COLORS[r.name], alpha=0.85, **(style[r.name] | {"lw": style[r.name]["lw"] * 0.75}),
                 label=f"{r.name}: " + ("last_grad_norm (pre-clip)" if r.gradfuse else "grad norm"))
    for r in runs:
        if r.name == "spikeskip":
            sx = [s for s, k in zip(steps, r.hist["skipped"]) if k]
            sy = [v for v, k in zip(r.hist["grad_norm"], r.hist["skipped"]) if k]
            axn.scatter(sx, sy, marker="o", s=40, facecolors="none", edgecolors=COLORS[r.name], lw=1.4, zorder=5,
                        label=f"spikeskip: cycle skipped ({len(sx)})")
    axn.axhline(args.max_grad_norm, color="k", ls="--", lw=0.8, label="max_grad_norm")
    axn.set_yscale("log")
    axn.set_ylim(min(v for r in runs if r.gradfuse for v in r.hist["grad_norm"] if v > 0) / 30,
                 gradfuse_top("grad_norm", 5))
    if sgd.diverged_at is not None:
        axn.annotate(f"SGD off-scale: up to {fmt(max(v for v in sgd.hist['grad_norm'] if math.isfinite(v)))}",
                     (sgd.diverged_at, gradfuse_top("grad_norm", 5)), xytext=(6, -14), textcoords="offset points",
                     color="tab:red", fontsize=9)
    axn.set_ylabel("global grad norm (pre-clip)")
    axn.legend(loc="lower left", fontsize=8, ncol=3)
    axn.grid(True, which="major", alpha=0.3)

    for r in runs:
        hx, hy = finite_xy(r.hist["hh_grad_norm"])
        axh.plot(hx, hy, color=COLORS[r.name], alpha=0.85, **(style[r.name] | {"lw": style[r.name]["lw"] * 0.75}),
                 label=r.name)
    axh.set_yscale("log")
    axh.set_ylim(min(v for r in runs if r.gradfuse for v in r.hist["hh_grad_norm"] if v > 0) / 30,
                 gradfuse_top("hh_grad_norm", 5))
    axh.set_ylabel("|grad weight_hh_l0| (pre-clip)")
    axh.set_title("recurrent weight's own gradient norm per cycle (gradfuse: opt.param_norms(); sgd: from .grad)", fontsize=9)
    axh.set_xlabel("optimizer step")
    axh.legend(loc="lower left", fontsize=8, ncol=4)
    axh.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    K = args.accum
    spikes = sorted({s for s in args.spike_steps if 1 <= s <= args.steps})

    torch.manual_seed(args.seed)
    models = {name: SeqRegressor(args.hidden).to(device) for name in RUNS}
    for name in RUNS[1:]:
        models[name].load_state_dict(models["sgd"].state_dict())  # identical initial weights

    common = dict(lr=args.lr, momentum=args.momentum, accumulation_steps=K, track_param_norms=True)
    zcap = args.zclip_max_grad_norm
    zcap = args.max_grad_norm if zcap is None else (None if str(zcap).lower() == "none" else float(zcap))
    zclip_args = dict(z_thresh=args.zclip_z_thresh, alpha=args.zclip_alpha, max_grad_norm=zcap)
    runs = [
        Run("sgd", "sgd: torch.optim.SGD (no clipping)", models["sgd"],
            torch.optim.SGD(models["sgd"].parameters(), lr=args.lr, momentum=args.momentum), K),
        Run("fixed", f"fixed: FusedAccumSGD(max_grad_norm={args.max_grad_norm:g})", models["fixed"],
            FusedAccumSGD(models["fixed"].parameters(), max_grad_norm=args.max_grad_norm, **common), K),
        Run("zclip", f"zclip: FusedAccumSGD(clip=ZClip(z_thresh={args.zclip_z_thresh:g}, max_grad_norm={zcap}))",
            models["zclip"],
            FusedAccumSGD(models["zclip"].parameters(), clip=gradfuse.ZClip(**zclip_args), **common), K,
            zclip_replay=gradfuse.ZClip(**zclip_args)),
        Run("spikeskip", f"spikeskip: max_grad_norm={args.max_grad_norm:g} + SpikeSkip({args.skip_window}, "
                         f"{args.skip_sigma:g}), step(loss=)", models["spikeskip"],
            FusedAccumSGD(models["spikeskip"].parameters(), max_grad_norm=args.max_grad_norm,
                          skip=gradfuse.SpikeSkip(window=args.skip_window, sigma=args.skip_sigma), **common),
            K, pass_loss=True),
    ]

    data_gen = torch.Generator().manual_seed(args.seed + 1)
    eval_data = make_batch(torch.Generator().manual_seed(args.seed + 2), args.eval_size, args.seq_len,
                           args.window, device)
    curve_eval = tuple(t[:args.curve_eval_size] for t in eval_data)
    eval0 = evaluate(models["fixed"], eval_data, args.window)

    print(f"device={device}  tanh RNN hidden={args.hidden}  T={args.seq_len}  lr={args.lr}  "
          f"momentum={args.momentum}  K={K} x micro-batch {args.micro_batch}  max_grad_norm={args.max_grad_norm}")
    print(f"injected spikes: first micro-batch x{args.spike_scale:g} at steps {spikes or 'none'}; "
          f"SpikeSkip decides from cycle {max(2, args.skip_window // 2)}")
    print(f"initial held-out loss {eval0:.4f} (predict-zero baseline 1.0)")
    header = (f"{'step':>5} | " + " ".join(f"{r.name:>9}" for r in runs) + " | "
              + " ".join(f"{r.name:>9}" for r in runs) + " | note")
    print(f"{'':>5} | {'held-out loss':^39} | {'pre-clip grad norm':^39} |")
    print(header)
    print("-" * len(header))

    steps = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        for m in range(K):
            x, y = make_batch(data_gen, args.micro_batch, args.seq_len, args.window, device)
            if m == 0 and step in spikes:
                x, y = x * args.spike_scale, y * args.spike_scale  # a mis-scaled record
            for r in runs:
                r.micro_batch(x, y, args.window)
        for r in runs:
            r.end_cycle(step, args.max_grad_norm, curve_eval, args.window)
        steps.append(step)
        if step == 1 or step % args.log_every == 0 or step == args.steps or step in spikes:
            note = ("spike" if step in spikes else "") + (" skipped" if runs[3].hist["skipped"][-1] else "")
            print(f"{step:>5} | " + " ".join(f"{fmt(r.hist['eval_loss'][-1]):>9}" for r in runs) + " | "
                  + " ".join(f"{fmt(r.hist['grad_norm'][-1]):>9}" for r in runs) + f" | {note.strip()}")
    elapsed = time.perf_counter() - t0

    tail = max(1, args.steps // 10)
    summary = {"initial_eval_loss": eval0, "train_seconds": elapsed, "spike_steps": spikes, "runs": {}}
    print("-" * len(header))
    print(f"training time {elapsed:.1f}s for {args.steps} steps x {K} micro-batches x {len(runs)} runs ({device})")
    print(f"{'run':>9} | {'final held-out':>14} | {'train loss':>10} | {'clipped':>7} | {'skipped':>7} | "
          f"{'spikes skipped':>14} | {'max |g|':>9} | {'max |g_hh|':>10}")
    for r in runs:
        h = r.hist
        final_eval = evaluate(r.model, eval_data, args.window) if r.alive else float("nan")
        tail_l = h["loss"][-tail:]
        final_train = sum(tail_l) / tail if all(math.isfinite(v) for v in tail_l) else float("nan")
        finite_norms = [v for v in h["grad_norm"] if math.isfinite(v)]
        max_norm = max(finite_norms, default=float("nan"))
        max_hh = max((v for v in h["hh_grad_norm"] if math.isfinite(v)), default=float("nan"))
        clipped, skipped = sum(h["clipped"]), sum(h["skipped"])
        spikes_skipped = [s for s in spikes if h["skipped"][s - 1]]
        s = {"final_eval_loss": finite_or_none(final_eval),
             f"final_train_loss_mean_last_{tail}": finite_or_none(final_train),
             "first_train_loss": h["loss"][0], "cycles_clipped": clipped if r.gradfuse else None,
             "cycles_skipped": skipped if r.gradfuse else None, "injected_spikes_skipped": spikes_skipped,
             "max_grad_norm_seen": finite_or_none(max_norm), "max_weight_hh_l0_grad_norm": finite_or_none(max_hh),
             "eval_loss_after_spikes": {str(sp): finite_or_none(h["eval_loss"][sp - 1]) for sp in spikes},
             "params_finite": all_finite(r.model), "diverged_at_step": r.diverged_at}
        if r.gradfuse:
            s["skipped_steps"] = int(r.opt.skipped_steps)
            s["demo_norm_vs_last_grad_norm_max_rel_diff"] = r.norm_rel_diff
            s["demo_weight_hh_l0_norm_vs_param_norms_max_rel_diff"] = r.hh_rel_diff
        summary["runs"][r.name] = s
        print(f"{r.name:>9} | {fmt(final_eval):>14} | {fmt(final_train):>10} | "
              f"{(str(clipped) if r.gradfuse else '-'):>7} | {(str(skipped) if r.gradfuse else '-'):>7} | "
              f"{(f'{len(spikes_skipped)}/{len(spikes)}' if r.gradfuse else '-'):>14} | {fmt(max_norm):>9} | "
              f"{fmt(max_hh):>10}")
    sgd = runs[0]
    if sgd.diverged_at is not None:
        print(f"sgd diverged: loss non-finite from step {sgd.diverged_at} "
              f"(largest finite loss {fmt(max(v for v in sgd.hist['loss'] if math.isfinite(v)))})")
    if spikes:
        print("held-out loss just after each spike: " + "; ".join(
            f"step {sp}: " + " ".join(f"{r.name} {fmt(r.hist['eval_loss'][sp - 1])}" for r in runs[1:])
            for sp in spikes))
    summary["zclip_same_updates_as_fixed"] = same_updates(runs)
    if summary["zclip_same_updates_as_fixed"]:
        print(f"zclip made the same updates as fixed: its adaptive threshold never fell below its cap "
              f"max_grad_norm={zcap:g} (ZClip can only clip harder than its cap)")
    if runs[1].opt.last_param_norms is not None:
        print("weight_hh_l0 norms of the gradfuse runs: opt.param_norms() (track_param_norms=True), equal to the demo's "
              f"own computation from .grad to {max(r.hh_rel_diff for r in runs[1:]):.1e} (relative)")
    print("the demo's norm from .grad over all parameters matches last_grad_norm to "
          f"{max(r.norm_rel_diff for r in runs[1:]):.1e} (relative)")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        curves = {"step": steps}
        for r in runs:
            for k in Run.KEYS:
                if r.gradfuse or k not in ("clipped", "skipped"):
                    curves[f"{k}_{r.name}"] = [json_value(v) for v in r.hist[k]]
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k not in ("plot", "json")} |
                       {"device": str(device), "torch": torch.__version__},
                       "notes": {"hh_grad_norm": "computed by the demo: the norm of the cycle's mean of "
                                                 "rnn.weight_hh_l0.grad read before each opt.step()",
                                 "grad_norm": "gradfuse runs: opt.last_grad_norm (pre-clip); sgd: computed by "
                                              "the demo from .grad",
                                 "clipped_zclip": "computed by the demo: opt.last_grad_norm replayed through a "
                                                  "separate gradfuse.ZClip with the same arguments (coefficient < 1)",
                                 "eval_loss": f"held-out loss on the first {args.curve_eval_size} eval sequences "
                                              f"after each update; final_eval_loss uses all {args.eval_size}"},
                       "summary": summary, "curves": curves}, f, indent=1)
        print(f"curves      : {args.json}")
    if args.plot:
        save_plot(args.plot, steps, runs, args, spikes)
        print(f"plot        : {args.plot}")

    # Self-checks (plain SGD's divergence is the expected outcome, not an error).
    problems = []
    fx = summary["runs"]["fixed"]
    final_f, eval_f = fx[f"final_train_loss_mean_last_{tail}"], fx["final_eval_loss"]
    if final_f is None or eval_f is None:
        problems.append("fixed: gradfuse ended with a non-finite loss")
    elif not eval_f <= 0.5 * eval0:
        problems.append(f"fixed: gradfuse did not train: held-out loss {eval0:.4f} -> {eval_f:.4f} (needs <= half)")
    elif not final_f < fx["first_train_loss"]:
        problems.append(f"fixed: gradfuse training loss did not decrease ({fx['first_train_loss']:.4f} -> "
                        f"{final_f:.4f})")
    for name in ("fixed", "zclip", "spikeskip"):
        s = summary["runs"][name]
        if name != "fixed" and (s[f"final_train_loss_mean_last_{tail}"] is None or s["final_eval_loss"] is None):
            problems.append(f"{name}: ended with a non-finite loss")
        if not s["params_finite"]:
            problems.append(f"{name}: parameters are non-finite")
    decidable = [s for s in spikes if s >= max(2, args.skip_window // 2)]
    if decidable and not summary["runs"]["spikeskip"]["injected_spikes_skipped"]:
        problems.append(f"spikeskip: skipped none of the injected spikes at steps {decidable}")
    if problems:
        print("SELF-CHECK FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("self-check  : OK (fixed trained; zclip and spikeskip finite; "
          + (f"spikeskip skipped {len(summary['runs']['spikeskip']['injected_spikes_skipped'])}/{len(spikes)} "
             "injected spikes)" if decidable else "no injected spike to skip)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
