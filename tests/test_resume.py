"""Exact resume with a real model: the model's and the optimizer's state_dicts saved after EVERY
micro-step of a cycle (K = 1..4), loaded into a FRESH model + optimizer, continue bit-identically
to the uninterrupted run. Extends test_optimizer's mid-cycle test (mixed dtypes in one optimizer,
K=3/4) with single-dtype models (fp32: the whole-bucket adoption path; bf16: fp32 accumulators;
fp64), K=1/2, every SGD variant, the model saved alongside, and a parameter that only gets a
gradient in some micro-steps (so the saved cycle has an accumulator for some params only)."""
import copy

import pytest
import torch
from torch import nn

from data import generator, randn
from gradfuse import FusedAccumSGD
from tolerances import assert_bitwise

VARIANTS = {
    "plain": dict(lr=0.1, weight_decay=0.01),
    "momentum-dampening": dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov-maximize": dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True),
}
CYCLES = 3


class Net(nn.Module):
    """A small MLP plus `extra`, used only in micro-batches whose index is not a multiple of 3."""

    def __init__(self, seed, dtype, device):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))
        self.extra = nn.Parameter(torch.randn(3))
        self.to(device=device, dtype=dtype)

    def forward(self, x, t):
        out = self.body(x)
        return out * self.extra if t % 3 else out


def make(seed, dtype, device, k, variant):
    model = Net(seed, dtype, device)
    body = list(model.body.parameters())
    opt = FusedAccumSGD([dict(params=body[:2]), dict(params=body[2:] + [model.extra], lr=0.07)],
                        accumulation_steps=k, max_grad_norm=0.5, **VARIANTS[variant])
    return model, opt


def micro_step(model, opt, batch, t):
    x, y = batch
    nn.functional.mse_loss(model(x, t), y).backward()
    opt.step()
    opt.zero_grad()


def state(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    out += [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()
            if "momentum_buffer" in opt.state.get(p, {})]
    return out + [opt.skipped_steps.clone(), opt.last_grad_norm.clone()]


@pytest.mark.parametrize("via_file", [False, True], ids=["memory", "torch.save"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_resume_at_every_micro_step_is_bit_identical(device, seed, tmp_path, dtype, k, variant, via_file):
    gen = generator(seed)
    data = [(randn((4, 6), dtype, device, gen), randn((4, 3), dtype, device, gen)) for _ in range(CYCLES * k)]
    model, opt = make(1, dtype, device, k, variant)
    start = [p.detach().clone() for p in model.parameters()]
    checkpoints = {}
    for t in range(CYCLES * k):
        if k <= t < 2 * k:  # every position of the second cycle: 0..K-1 micro-steps accumulated
            assert opt.micro_step == t - k
            checkpoints[t] = copy.deepcopy(dict(model=model.state_dict(), opt=opt.state_dict()))
        micro_step(model, opt, data[t], t)
    expected = state(model, opt)
    assert all(not torch.equal(a, b) for a, b in zip(start, model.parameters())), "the run should train"

    for t, saved in checkpoints.items():
        if via_file:
            torch.save(saved, tmp_path / "ckpt.pt")
            saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        position = t - k
        accumulated = saved["opt"]["gradfuse"]["accumulators"]
        assert saved["opt"]["gradfuse"]["micro_step"] == position and bool(accumulated) == (position > 0)
        if position:  # `extra` has no accumulator while its micro-batches so far were all multiples of 3
            silent = all(u % 3 == 0 for u in range(k, t))
            assert len(accumulated) == len(start) - silent
        fresh_model, fresh_opt = make(2, dtype, device, k, variant)  # other init: loading must matter
        assert not torch.equal(next(fresh_model.parameters()), next(model.parameters()))
        fresh_model.load_state_dict(saved["model"])
        fresh_opt.load_state_dict(saved["opt"])
        assert fresh_opt.micro_step == position
        for u in range(t, CYCLES * k):
            micro_step(fresh_model, fresh_opt, data[u], u)
        got = state(fresh_model, fresh_opt)
        assert len(got) == len(expected)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_bitwise(a, b, f"resumed after {position} micro-steps of cycle 2: tensor {i}")


@pytest.mark.parametrize("k", [2, 4])
def test_resume_when_a_param_has_no_gradient_in_the_saved_cycle_so_far(device, seed, k):
    # A parameter without any gradient so far in the open cycle has no accumulator in the
    # checkpoint; it gets one after the resume (first=True path on the restored optimizer).
    gen = generator(seed)
    shapes, dtypes = [(5,), (2, 3), (4,)], [torch.float32, torch.bfloat16, torch.float64]
    grads = [[randn(s, d, device, gen) for s, d in zip(shapes, dtypes)] for _ in range(3 * k)]
    for t in range(k, 2 * k - 1):
        grads[t][1] = grads[t][2] = None  # silent until the last micro-step of cycle 2
    runs = []
    for resume in (False, True):
        params = [randn(s, d, device, generator(seed + 1)) for s, d in zip(shapes, dtypes)]
        opt = FusedAccumSGD(params, lr=0.1, momentum=0.9, accumulation_steps=k, max_grad_norm=1.0)
        for t in range(3 * k):
            if resume and t == 2 * k - 1:
                saved = copy.deepcopy(opt.state_dict())
                assert set(saved["gradfuse"]["accumulators"]) == {0}
                params = [p.detach().clone() for p in params]
                opt = FusedAccumSGD(params, lr=0.3, accumulation_steps=k, max_grad_norm=1.0)
                opt.load_state_dict(saved)
            for p, g in zip(params, grads[t]):
                p.grad = None if g is None else g.clone()
            opt.step()
            opt.zero_grad()
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    for a, b in zip(pa, pb):
        assert_bitwise(a, b, "param")
        assert_bitwise(oa.state[a]["momentum_buffer"], ob.state[b]["momentum_buffer"], "momentum")
