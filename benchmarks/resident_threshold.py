"""Where keeping a running sum in .grad pays, measured: the default mode with every tensor's sum in
.grad (a post-accumulate-grad hook per tensor; autograd adds each micro-batch in place) against every
sum apart (the fused accumulate pass adds it), real autograd, K = 4, interleaved in one process:
python -m benchmarks.resident_threshold [--device cpu|cuda] [--reps N]. The result sets
gradfuse.resident_store.RESIDENT_MIN_ELEMENTS (docs/semantics.md)."""
import argparse

import torch
from torch import nn

import gradfuse
from gradfuse import resident_store

from .training_update import header, interleaved_medians, timed_update

CASES = ((16, 1000), (256, 200), (1024, 16))  # (width, layers): 256, 64K and 1M-element weights
K = 4


def _optimizer(model, threshold):
    saved = resident_store.RESIDENT_MIN_ELEMENTS
    resident_store.RESIDENT_MIN_ELEMENTS = threshold  # read when the store is built
    try:
        return gradfuse.FusedAccumSGD(model.parameters(), lr=1e-4, momentum=0.9, accumulation_steps=K,
                                      max_grad_norm=1.0)
    finally:
        resident_store.RESIDENT_MIN_ELEMENTS = saved


def run(device, reps):
    rows = []
    for width, layers in CASES:
        torch.manual_seed(0)
        base = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
        sides = {}
        for side, threshold in (("in_grad", 0), ("apart", 1 << 62)):
            model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
            model.load_state_dict(base.state_dict())
            sides[side] = (model, _optimizer(model, threshold))
        x = torch.randn(4, width, device=device)
        med = interleaved_medians(sides, reps, lambda side: timed_update(*sides[side], x, K, device))
        tensors = 2 * layers
        rows.append(dict(case=f"{layers} x Linear({width}) K={K}", in_grad_ms=med["in_grad"], apart_ms=med["apart"],
                         us_per_tensor_micro_batch=(med["in_grad"] - med["apart"]) * 1e3 / (K * tensors)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(header(device, "every sum in .grad vs every sum apart, ms per update"))
    for row in run(device, args.reps):
        print(f"  {row['case']}: in .grad {row['in_grad_ms']:.2f} ms, apart {row['apart_ms']:.2f} ms, "
              f"{row['us_per_tensor_micro_batch']:+.2f} us per tensor per micro-batch")


if __name__ == "__main__":
    main()
