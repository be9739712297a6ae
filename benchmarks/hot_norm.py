"""Fused while hot, measured: accumulate_in_backward=True with the cycle's norm taken by the backward
hooks while each gradient is in cache, against the norm pass at the cycle's end, on real autograd
(interleaved, same process): python -m benchmarks.hot_norm [--device cpu|cuda] [--reps N]. The
result decides gradfuse.backward_hook_store.takes_norm_hot (docs/benchmarks.md)."""
import argparse

import torch
from torch import nn

import gradfuse
from gradfuse import backward_hook_store

from .training_update import header, interleaved_medians, timed_update

CASES = ((1024, 8, 1), (1024, 8, 4), (4096, 4, 1), (256, 200, 1))  # (width, layers, K)


def run(device, reps):
    policy = backward_hook_store.takes_norm_hot
    rows = []
    for width, layers, k in CASES:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)
        opt = gradfuse.FusedAccumSGD(model.parameters(), lr=1e-4, momentum=0.9, accumulation_steps=k,
                                     max_grad_norm=1.0, accumulate_in_backward=True)
        x = torch.randn(4, width, device=device)

        def one_update(mode):
            backward_hook_store.takes_norm_hot = (lambda d, n: True) if mode == "hot" else (lambda d, n: False)
            return timed_update(model, opt, x, k, device)
        try:
            med = interleaved_medians(("hot", "end"), reps, one_update)
        finally:
            backward_hook_store.takes_norm_hot = policy
        rows.append(dict(case=f"{layers} x Linear({width}) K={k}", hot_ms=med["hot"], end_ms=med["end"],
                         end_over_hot=med["end"] / med["hot"]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(header(device, "accumulate_in_backward=True, norm while hot vs at the cycle's end"))
    for row in run(device, args.reps):
        print(f"  {row['case']}: hot {row['hot_ms']:.2f} ms, end {row['end_ms']:.2f} ms, "
              f"end/hot {row['end_over_hot']:.3f}")


if __name__ == "__main__":
    main()
