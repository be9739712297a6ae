#!/usr/bin/env python
"""Drop-in usage of gradfuse.FusedAccumSGD with an LR scheduler and a mid-cycle checkpoint.

A small MLP is fitted to a synthetic regression target. FusedAccumSGD replaces torch.optim.SGD:
step() and zero_grad() are called after EVERY micro-batch, the optimizer averages K micro-batch
gradients, clips their global norm and updates on every K-th call. The LR scheduler is stepped
once per optimizer cycle (when `opt.sync_gradients` said the micro-batch was the last one).

The script trains twice with the same seed:
  1. straight through,
  2. stopped in the middle of a cycle (after `--save-at` micro-batches, not a multiple of K),
     checkpointed to disk (model, optimizer incl. its partial accumulators and micro-step,
     scheduler, data position), rebuilt from scratch, reloaded and finished.
and checks that both end with the same weights (bitwise on CPU). Exit status 1 if they differ
or the loss did not go down.

    python examples/train_demo.py
    python examples/train_demo.py --device cpu --cycles 60 --save-at 50 --ckpt /tmp/demo.pt
"""
import argparse
import os
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from gradfuse import FusedAccumSGD


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cycles", type=int, default=100, help="optimizer updates (each = K micro-batches)")
    p.add_argument("--accumulation-steps", "-K", type=int, default=4, dest="accum")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--save-at", type=int, default=202,
                   help="micro-batches before the checkpoint (use a non-multiple of K for a mid-cycle save)")
    p.add_argument("--ckpt", default=None, help="checkpoint path (default: a temporary file)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_model(device, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).to(device)


def micro_batch(index, size, device, seed):
    """Micro-batch `index` of a deterministic stream (resuming only needs the index)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    x = torch.randn(size, 8, generator=g)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.5 * x[:, 4:5] * x[:, 5:6] + 0.05 * torch.randn(size, 1, generator=g)
    return x.to(device), y.to(device)


def build(args, device):
    """Model, optimizer and scheduler: exactly what a torch.optim.SGD script would build."""
    model = make_model(device, args.seed)
    opt = FusedAccumSGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4,
                        accumulation_steps=args.accum, max_grad_norm=args.max_grad_norm)
    warmup = max(1, args.cycles // 10)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.cycles - warmup)], milestones=[warmup])
    return model, opt, sched


def train(args, device, model, opt, sched, start, stop, log=None):
    """Micro-batches [start, stop). Returns the mean loss of the last cycle that ended."""
    cycle_loss, last = 0.0, float("nan")
    for i in range(start, stop):
        x, y = micro_batch(i, args.micro_batch, device, args.seed)
        loss = F.mse_loss(model(x), y)
        loss.backward()                 # no division by K: FusedAccumSGD averages the K gradients
        boundary = opt.sync_gradients   # True when this micro-batch completes the cycle
        opt.step()                      # accumulate; on the K-th call: clip + SGD update
        opt.zero_grad()
        cycle_loss += loss.item() / args.accum
        if boundary:
            sched.step()                # once per optimizer update, as with torch.optim.SGD
            cycle = (i + 1) // args.accum
            if log and (cycle == 1 or cycle % 10 == 0):
                log(f"  cycle {cycle:>4}  loss {cycle_loss:.4f}  grad-norm {float(opt.last_grad_norm):7.3f}  "
                    f"lr {opt.param_groups[0]['lr']:.4f}")
            last, cycle_loss = cycle_loss, 0.0
    return last


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    total = args.cycles * args.accum
    if not 0 < args.save_at < total:
        sys.exit(f"--save-at must be in (0, {total})")

    print(f"[1] uninterrupted run: {args.cycles} cycles x K={args.accum} micro-batches on {device}")
    model_a, opt_a, sched_a = build(args, device)
    with torch.no_grad():
        x0, y0 = micro_batch(-1, 1024, device, args.seed)  # held-out batch
        initial = F.mse_loss(model_a(x0), y0).item()
    train(args, device, model_a, opt_a, sched_a, 0, total, log=print)

    print(f"[2] interrupted run: checkpoint after micro-batch {args.save_at} "
          f"(micro-step {args.save_at % args.accum} of cycle {args.save_at // args.accum + 1})")
    model_b, opt_b, sched_b = build(args, device)
    train(args, device, model_b, opt_b, sched_b, 0, args.save_at)
    print(f"  saving: opt.micro_step = {opt_b.micro_step}, lr = {opt_b.param_groups[0]['lr']:.4f}")
    ckpt = args.ckpt or os.path.join(tempfile.mkdtemp(prefix="gradfuse_demo_"), "ckpt.pt")
    torch.save({"model": model_b.state_dict(), "optimizer": opt_b.state_dict(),
                "scheduler": sched_b.state_dict(), "next_micro_batch": args.save_at}, ckpt)
    del model_b, opt_b, sched_b

    model_c, opt_c, sched_c = build(args, device)  # fresh objects, as in a new process
    state = torch.load(ckpt, map_location=device, weights_only=True)
    model_c.load_state_dict(state["model"])
    opt_c.load_state_dict(state["optimizer"])
    sched_c.load_state_dict(state["scheduler"])
    print(f"  resumed from {ckpt}: opt.micro_step = {opt_c.micro_step}, lr = {opt_c.param_groups[0]['lr']:.4f}")
    train(args, device, model_c, opt_c, sched_c, state["next_micro_batch"], total)

    with torch.no_grad():
        final_a = F.mse_loss(model_a(x0), y0).item()
        final_c = F.mse_loss(model_c(x0), y0).item()
    pairs = [(a.detach(), c.detach()) for a, c in zip(model_a.parameters(), model_c.parameters())]
    exact = all(torch.equal(a, c) for a, c in pairs)
    max_diff = max(float((a - c).abs().max()) for a, c in pairs)
    print(f"held-out loss: initial {initial:.4f} -> uninterrupted {final_a:.4f}, resumed {final_c:.4f}")
    print(f"weights uninterrupted vs resumed: {'bitwise identical' if exact else f'max |diff| {max_diff:.3e}'}")

    ok = final_a < 0.5 * initial and (exact if device.type == "cpu" else max_diff <= 1e-5)
    print("self-check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
