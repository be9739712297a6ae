"""The optimizer's share of a K=1 training step, as timing.Bench objects: everything a training
loop calls on the optimizer side after backward, with the gradients already where backward
leaves them (put there by an untimed setup).

  gradfuse        FusedAccumSGD(max_grad_norm=1.0): step(); zero_grad()   (p.grad assigned by setup)
  gradfuse_flat   the same with flat_buffers=True: step(); zero_grad()    (gradients copied into the
                  flat .grad views by setup, where autograd would have added them)
  torch_*         clip_grad_norm_(params, 1.0, foreach=True); SGD(fused=True | foreach=True).step();
                  zero_grad()                                             (p.grad assigned by setup)
"""
import torch

from .cases import MAX_NORM, GradSet, make_optimizer, make_params
from .timing import Bench


def step_benches(shapes, dtype, device, n_sets, impls):
    """name -> Bench of one K=1 optimizer step. Returns (benches, keepalive)."""
    sets = [GradSet(shapes, dtype, device, 1) for _ in range(n_sets)]
    benches, keep = {}, [sets]
    for name in impls:
        states = []
        for _ in range(n_sets):
            params = make_params(shapes, dtype, device)
            opt = make_optimizer(name, params)
            if opt is not None:
                states.append((params, opt))
        if not states:
            continue
        keep.append(states)
        benches[name] = Bench(_step(states, name), _setup(states, sets, name), n_sets)
    return benches, keep


def _setup(states, sets, name):
    if name == "gradfuse_flat":
        views = [[p.grad for p in params] for params, _ in states]

        def flat(i):
            torch._foreach_copy_(views[i], sets[i].micro[0])
        return flat

    def assign(i):
        sets[i].restore()  # clip_grad_norm_ scales the gradients in place
        for p, g in zip(states[i][0], sets[i].work):
            p.grad = g
    return assign


def _step(states, name):
    if name.startswith("gradfuse"):
        def fused(i):
            opt = states[i][1]
            opt.step()
            opt.zero_grad()
        return fused

    def baseline(i):
        params, opt = states[i]
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        opt.step()
        opt.zero_grad()
    return baseline
