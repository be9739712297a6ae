"""One optimizer update of a real training loop, per mode, as the end-to-end rows run it.

  gradfuse           FusedAccumSGD(accumulation_steps=K, max_grad_norm=1.0, momentum=0.9):
                     loss.backward(); opt.step(); opt.zero_grad()  after every micro-batch
  gradfuse_apart     the same with sum_in_grad=False (each micro-batch's .grad apart from the sums)
  gradfuse_flat      the same with flat_buffers=True
  gradfuse_backward  the same with accumulate_in_backward=True
  torch_fused        (loss / K).backward() after every micro-batch (autograd adds into .grad), then
  torch_foreach      clip_grad_norm_(foreach=True), SGD(momentum=0.9, fused=True resp. foreach=True).step(),
                     zero_grad() once per update

The optimizer calls (everything but forward and backward) run inside clock.section(), so a row
can report the optimizer's share of the step.
"""
import contextlib
import time

import torch

import gradfuse

from .cases import LR, MAX_NORM, MOMENTUM
from .e2e_models import loss_of

GRADFUSE_OPTIONS = {"gradfuse": {}, "gradfuse_apart": {"sum_in_grad": False}, "gradfuse_flat": {"flat_buffers": True},
                    "gradfuse_backward": {"accumulate_in_backward": True}}
TORCH_OPTIONS = {"torch_fused": {"fused": True}, "torch_foreach": {"foreach": True}}
MODES = tuple(GRADFUSE_OPTIONS) + tuple(TORCH_OPTIONS)


def make_optimizer(mode, model, K, lr=LR):
    params = list(model.parameters())
    if mode in GRADFUSE_OPTIONS:
        return gradfuse.FusedAccumSGD(params, lr=lr, momentum=MOMENTUM, accumulation_steps=K, max_grad_norm=MAX_NORM,
                                      **GRADFUSE_OPTIONS[mode])
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, **TORCH_OPTIONS[mode])


class OptimizerClock:
    """Time spent inside the optimizer calls, per update: perf_counter on CPU, CUDA events on a GPU
    (no synchronisation inside the timed step)."""

    def __init__(self, device=None):
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.updates = []

    def begin_update(self):
        self.updates.append([])

    @contextlib.contextmanager
    def section(self):
        if not self.updates:
            self.begin_update()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.updates[-1].append((start, end))
            return
        t0 = time.perf_counter()
        yield
        self.updates[-1].append(time.perf_counter() - t0)

    def seconds(self, last):
        """Optimizer seconds of each of the last `last` updates."""
        if self.cuda:
            torch.cuda.synchronize()
            return [sum(s.elapsed_time(e) * 1e-3 for s, e in parts) for parts in self.updates[-last:]]
        return [sum(parts) for parts in self.updates[-last:]]


def update(mode, model, params, opt, data, clock):
    """One optimizer update over the micro-batches in `data` (K = len(data))."""
    clock.begin_update()
    if mode in GRADFUSE_OPTIONS:
        for x in data:
            loss_of(model, x).backward()  # not divided by K: gradfuse averages the K micro-batches
            with clock.section():
                opt.step()
                opt.zero_grad()
        return
    for x in data:
        (loss_of(model, x) / len(data)).backward()
    with clock.section():
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        opt.step()
        opt.zero_grad()
