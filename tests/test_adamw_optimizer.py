"""FusedAccumAdamW end to end: against torch.optim.AdamW with manual accumulation and
clip_grad_norm_, against a float64 cycle reference with missing gradients and non-finite
cycles, skipped cycles leaving moments and step counts alone, checkpoints both ways with
torch.optim.AdamW, mid-cycle resume, and hyperparameter validation."""
import copy
import math

import pytest
import torch
from torch import nn

import reference as ref
import reference_adamw as ref_adamw
from data import randn
from gradfuse import FusedAccumAdamW
from problems import batches, make_model
from tolerances import assert_bitwise, assert_close

F32, F64 = torch.float32, torch.float64
HYPER = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def torch_reference(model, data, k, max_norm, **hyper):
    """torch.optim.AdamW on the mean of K micro-gradients, clipped by clip_grad_norm_."""
    opt = torch.optim.AdamW(model.parameters(), **hyper)
    for i, (x, y) in enumerate(data):
        (nn.functional.mse_loss(model(x), y) / k).backward()
        if (i + 1) % k == 0:
            if max_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            opt.zero_grad()
    return opt


def fused_run(model, data, k, max_norm, **hyper):
    opt = FusedAccumAdamW(model.parameters(), accumulation_steps=k, max_grad_norm=max_norm, **hyper)
    for x, y in data:
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("k,max_norm,amsgrad,maximize", [(1, None, False, False), (3, 0.05, False, False),
                                                         (4, 0.05, True, False), (2, 10.0, False, True)])
def test_matches_torch_adamw_with_manual_accumulation_and_clipping(device, dtype, k, max_norm, amsgrad, maximize):
    data = batches(5, 4 * k, dtype, device)
    expected = make_model(3, dtype, device)
    torch_reference(expected, data, k, max_norm, amsgrad=amsgrad, maximize=maximize, **HYPER)
    got = make_model(3, dtype, device)
    fused_run(got, data, k, max_norm, amsgrad=amsgrad, maximize=maximize, **HYPER)
    for i, (p, q) in enumerate(zip(got.parameters(), expected.parameters())):
        # torch sums (grad_i / K) in autograd; gradfuse sums grad_i and scales once: a few ulps.
        rtol, atol = (1e-10, 1e-12) if dtype == F64 else (2e-5, 2e-6)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol, msg=f"parameter {i}")


def test_tensor_lr_matches_float_lr(device):
    data = batches(6, 6, F32, device)
    a, b = make_model(4, F32, device), make_model(4, F32, device)
    hyper = dict(HYPER)
    fused_run(a, data, 3, 0.1, **hyper)
    hyper["lr"] = torch.tensor(hyper["lr"], device=device)
    fused_run(b, data, 3, 0.1, **hyper)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_bitwise(p.detach(), q.detach(), "tensor lr")


class CycleReference:
    """FusedAccumAdamW's semantics in float64: A = sum of present gradients / K, the global norm,
    skip when non-finite, clip, then AdamW per parameter that had a gradient this cycle."""

    def __init__(self, params, k, max_norm, norm_type, hyper):
        self.params = [ref.as64(p) for p in params]
        self.state = [None] * len(params)
        self.k, self.max_norm, self.norm_type, self.hyper = k, max_norm, norm_type, hyper
        self.accs, self.micro, self.skipped = [None] * len(params), 0, 0

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is not None:
                self.accs[i] = ref.as64(g) if self.accs[i] is None else self.accs[i] + ref.as64(g)
        self.micro += 1
        if self.micro < self.k:
            return
        present = [i for i, a in enumerate(self.accs) if a is not None]
        mean = {i: self.accs[i] / self.k for i in present}
        norm = ref.total_norm([mean[i] for i in present], self.norm_type) if present else 0.0
        if not math.isfinite(norm):
            self.skipped += 1
        else:
            factor = ref_adamw.clip_factor(norm, self.max_norm)
            beta1, beta2 = self.hyper["betas"]
            for i in present:
                p = self.params[i]
                m, v, s = self.state[i] or (torch.zeros_like(p), torch.zeros_like(p), 0.0)
                new, _ = ref_adamw.adamw_update(p, mean[i] * factor, m, v, None, s + 1, lr=self.hyper["lr"],
                                                beta1=beta1, beta2=beta2, eps=self.hyper["eps"],
                                                weight_decay=self.hyper["weight_decay"], amsgrad=False)
                self.params[i], self.state[i] = new["param"], (new["exp_avg"], new["exp_avg_sq"], s + 1)
        self.accs, self.micro = [None] * len(self.params), 0


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_float64_reference_with_missing_gradients_and_nonfinite_cycles(device, gen, dtype, norm_type):
    shapes = [(7,), (3, 5), (1,), (33,)]
    params = [randn(s, dtype, device, gen) for s in shapes]
    k, max_norm = 3, 0.2
    reference = CycleReference(params, k, max_norm, norm_type, HYPER)
    opt = FusedAccumAdamW(params, accumulation_steps=k, max_grad_norm=max_norm, norm_type=norm_type, **HYPER)
    for t in range(4 * k):
        grads = [randn(s, dtype, device, gen) for s in shapes]
        if t < k:
            grads[2] = None  # parameter 2 has no gradient in the first cycle: untouched
        if t % k == 1:
            grads[0] = None  # a missing gradient in the middle of every cycle counts as zero
        if t == 2 * k + 1:
            grads[1].view(-1)[3] = math.inf  # cycle 3 is skipped
        if t == k + 2:
            grads = [None] * len(shapes)  # a micro-batch without any gradient counts toward K
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        reference.step(grads)
    assert int(opt.skipped_steps) == reference.skipped == 1
    for i, (p, want) in enumerate(zip(params, reference.params)):
        assert_close(p, want, dtype, f"parameter {i}")
        steps = opt.state[p]["step"]
        assert float(steps) == reference.state[i][2], f"step count of parameter {i}"
        assert_close(opt.state[p]["exp_avg"], reference.state[i][0], dtype, f"exp_avg {i}")


def test_skipped_cycle_changes_neither_moments_nor_step(device, gen):
    p = nn.Parameter(randn((9,), F32, device, gen))
    opt = FusedAccumAdamW([p], accumulation_steps=2, max_grad_norm=1.0, **HYPER)
    for _ in range(2):
        p.grad = randn((9,), F32, device, gen)
        opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    p_before = p.detach().clone()
    for t in range(2):
        p.grad = randn((9,), F32, device, gen)
        if t == 0:
            p.grad[4] = math.nan
        opt.step()
    assert int(opt.skipped_steps) == 1
    assert_bitwise(p.detach(), p_before, "param")
    for key, value in before.items():
        assert_bitwise(opt.state[p][key], value, key)
    assert opt.state[p]["step"].device == p.device, "the step count lives on the parameter's device"


@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_moves_to_torch_adamw_and_back(device, amsgrad):
    data = batches(9, 12, F64, device)
    hyper = dict(HYPER, amsgrad=amsgrad)
    straight = make_model(1, F64, device)
    torch_reference(straight, data, 1, None, **hyper)
    # gradfuse for 6 steps, torch.optim.AdamW for the last 6, from gradfuse's checkpoint
    first = make_model(1, F64, device)
    opt = fused_run(first, data[:6], 1, None, **hyper)
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    second = torch.optim.AdamW(first.parameters(), **hyper)
    second.load_state_dict(saved)
    for x, y in data[6:]:
        nn.functional.mse_loss(first(x), y).backward()
        second.step()
        second.zero_grad()
    for p, q in zip(first.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    # torch.optim.AdamW for 6 steps, gradfuse for the last 6, from torch's checkpoint
    third = make_model(1, F64, device)
    t_opt = torch_reference(third, data[:6], 1, None, **hyper)
    g_opt = FusedAccumAdamW(third.parameters(), **hyper)
    g_opt.load_state_dict(copy.deepcopy(t_opt.state_dict()))
    for x, y in data[6:]:
        nn.functional.mse_loss(third(x), y).backward()
        g_opt.step()
        g_opt.zero_grad()
    for p, q in zip(third.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
def test_mid_cycle_checkpoint_resumes_bit_identically(device, cut):
    data = batches(10, 8, F32, device)
    straight = make_model(2, F32, device)
    fused_run(straight, data, 4, 0.1, **HYPER)
    model = make_model(2, F32, device)
    opt = fused_run(model, data[:cut], 4, 0.1, **HYPER)
    saved = copy.deepcopy(opt.state_dict())
    resumed = FusedAccumAdamW(model.parameters(), accumulation_steps=4, max_grad_norm=0.1, **HYPER)
    resumed.load_state_dict(saved)
    for x, y in data[cut:]:
        nn.functional.mse_loss(model(x), y).backward()
        resumed.step()
        resumed.zero_grad()
    for p, q in zip(model.parameters(), straight.parameters()):
        assert_bitwise(p.detach(), q.detach(), f"resume after micro-step {cut}")


@pytest.mark.parametrize("bad,pattern", [
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(eps=0.0), "Invalid epsilon value"),
    (dict(eps=-1e-8), "Invalid epsilon value"),
    (dict(lr=-0.1), "Invalid learning rate"),
    (dict(lr=math.nan), "Invalid learning rate"),
    (dict(weight_decay=-0.01), "Invalid weight_decay value"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(accumulation_steps=0), "accumulation_steps"),
])
def test_bad_hyperparameters_are_rejected(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        FusedAccumAdamW([torch.zeros(3)], **bad)


def test_bad_group_hyperparameter_in_a_loaded_state_dict_changes_nothing(gen):
    p = nn.Parameter(randn((4,), F32, "cpu", gen))
    opt = FusedAccumAdamW([p], **HYPER)
    p.grad = randn((4,), F32, "cpu", gen)
    opt.step()
    saved = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    broken = copy.deepcopy(saved)
    broken["param_groups"][0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="FusedAccumAdamW.load_state_dict: parameter group 0: Invalid beta"):
        opt.load_state_dict(broken)
    broken = copy.deepcopy(saved)
    broken["state"][0]["step"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="step of parameter 0"):
        opt.load_state_dict(broken)
    for key, value in before.items():
        assert_bitwise(opt.state[p][key], value, key)
