"""Half-precision results to the rule of tests/tolerances.py: float32 math rounded once to fp16/bf16
is within 1 ulp of the float64 reference rounded once (an update computed in the half type is not)."""
import pytest
import torch

import reference as ref
from data import HALF_DTYPES, randn
from gradfuse import FusedAccumSGD, ops
from tolerances import ONCE, assert_close, ulp_distance

F32, F64, F16 = torch.float32, torch.float64, torch.float16
N = 4096
CONFIGS = {
    "momentum-damp-wd": dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False),
    "nesterov-wd-maximize": dict(momentum=0.8, dampening=0.0, weight_decay=0.05, nesterov=True, maximize=True),
}


@pytest.mark.parametrize("grad_dtype", ["param", F32], ids=["grad-half", "grad-f32"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_sgd_step_within_one_ulp(device, gen, dtype, config, grad_dtype):
    grad_dtype = dtype if grad_dtype == "param" else grad_dtype
    params = [randn((N,), dtype, device, gen)]
    grads = [randn((N,), grad_dtype, device, gen)]
    buffers = [randn((N,), dtype, device, gen)]
    flags = [torch.tensor(True, device=device)]  # a buffer from an earlier step: the blend is exercised
    old_params, old_buffers = [params[0].clone()], [buffers[0].clone()]
    norm = ref.total_norm(grads, 2.0) * 0.5
    max_norm = 0.7 * norm  # clip active: grad_mult = grad_scale * clip factor
    ops.clipped_sgd_step_(params, grads, buffers, flags, torch.tensor(norm, dtype=F64, device=device), 0.1,
                          grad_scale=0.5, max_norm=max_norm, **CONFIGS[config])
    want_p, want_b, _ = ref.clipped_sgd_step(old_params, grads, old_buffers, [True], norm, lr=0.1, grad_scale=0.5,
                                             max_norm=max_norm, skip_nonfinite=True, dtype=None, **CONFIGS[config])
    assert ONCE[dtype].ulps == 1  # the rule this file exists for
    assert_close(params[0], want_p[0], dtype, "params")
    assert_close(buffers[0], want_b[0], dtype, "momentum_buffers")
    # Not a vacuous pass: the update moved most values by more than an ulp.
    assert float((ulp_distance(old_params[0].double().cpu(), want_p[0], dtype) > 1).double().mean()) > 0.5


def test_fp16_sum_past_fp16_range_issue_example(device):
    # K=4 gradients of 30000: the sum (120000) overflows fp16, the mean (30000) does not.
    param = torch.tensor([1.0, -2.0, 0.5], dtype=F16, device=device)
    opt = FusedAccumSGD([param], lr=1e-5, accumulation_steps=4)
    for _ in range(4):
        param.grad = torch.full((3,), 30000.0, dtype=F16, device=device)
        opt.step()
        opt.zero_grad()
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=F64) - 1e-5 * 30000.0  # about [0.7, -2.3, 0.2]
    assert torch.isfinite(param).all(), f"fp16 sum overflowed: {param.tolist()}"
    assert_close(param, expected, F16, "param")


@pytest.mark.parametrize("clip", [None, 1e9], ids=["no-norm", "norm"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fp16_random_sum_past_fp16_range(device, gen, momentum, clip):
    # Random gradients of 2e4..4e4 in magnitude: every K=4 sum leaves fp16's range (65504).
    k = 4
    start = randn((N,), F16, device, gen)
    param = start.clone()
    sign = randn((N,), F64, "cpu", gen).sign()  # one sign per element, so the K values add up
    grads = [(sign * (3e4 + 5e3 * randn((N,), F64, "cpu", gen).clamp(-2, 2))).to(F16).to(device) for _ in range(k)]
    assert float(sum(g.double() for g in grads).abs().min()) > 65504
    opt = FusedAccumSGD([param], lr=1e-5, momentum=momentum, weight_decay=0.01, accumulation_steps=k,
                        max_grad_norm=clip)
    model = ref.ReferenceAccumSGD([start], [dict(params=[0], lr=1e-5, momentum=momentum, weight_decay=0.01)],
                                  accumulation_steps=k, max_grad_norm=clip, storage=[F16], acc_storage=[F32])
    for g in grads:
        param.grad = g.clone()
        opt.step()
        opt.zero_grad()
        model.step([g])
    assert int(opt.skipped_steps) == 0, "a finite cycle was skipped"
    assert_close(param, model.params[0], F16, "param")
