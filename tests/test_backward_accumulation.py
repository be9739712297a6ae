"""accumulate_in_backward=True: the same training as the default mode, .grad freed as soon as
autograd produced it, a lower peak memory while a cycle is open, and clear errors where the
mode cannot work (GradScaler, DTensor, torch.distributed)."""
import pytest
import torch
from torch import nn

from data import DEVICES
from gradfuse import FusedAccumAdamW, FusedAccumSGD
from tolerances import assert_close

OPTIMIZERS = {
    "sgd": (FusedAccumSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adamw": (FusedAccumAdamW, dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)),
}


def make_model(dtype, device):
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(7, 19), nn.Tanh(), nn.Linear(19, 19), nn.Tanh(), nn.Linear(19, 2)).to(
        device=device, dtype=dtype)


def train(name, dtype, device, k, in_backward, check_freed=False):
    cls, hyper = OPTIMIZERS[name]
    model = make_model(dtype, device)
    opt = cls(model.parameters(), accumulation_steps=k, max_grad_norm=0.05, accumulate_in_backward=in_backward,
              **hyper)
    gen = torch.Generator().manual_seed(12)
    norms = []
    for t in range(3 * k):
        x = torch.randn(6, 7, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        model(x).square().mean().backward()
        if check_freed:
            assert all(p.grad is None for p in model.parameters()), "the hooks must free .grad during backward"
        opt.step()
        opt.zero_grad()
        if opt.micro_step == 0:
            norms.append(float(opt.last_grad_norm))
    return model, norms


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
def test_same_training_as_the_default_mode(device, name, dtype, k):
    expected, expected_norms = train(name, dtype, device, k, False)
    got, norms = train(name, dtype, device, k, True, check_freed=True)
    for i, (p, q) in enumerate(zip(got.parameters(), expected.parameters())):
        assert_close(p, q.detach().double(), dtype, f"parameter {i}")
    for a, b in zip(norms, expected_norms):
        assert abs(a - b) <= 1e-6 * abs(b), f"norm {a} != {b}"


def test_grad_scaler_is_refused_with_a_clear_error():
    model = make_model(torch.float32, "cpu")
    opt = FusedAccumSGD(model.parameters(), lr=0.1, accumulation_steps=2, accumulate_in_backward=True)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(3, 7)).square().mean()).backward()
    with pytest.raises(RuntimeError, match="accumulate_in_backward=True cannot be used with GradScaler"):
        scaler.step(opt)


def test_flag_must_be_a_bool():
    with pytest.raises(TypeError, match="accumulate_in_backward must be a bool"):
        FusedAccumSGD([nn.Parameter(torch.randn(3))], accumulate_in_backward=1)


def test_groups_added_later_get_hooks_too():
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    opt = FusedAccumSGD([a], lr=0.1, accumulation_steps=2, accumulate_in_backward=True)
    opt.add_param_group(dict(params=[b]))
    (a * b).sum().backward()
    assert a.grad is None and b.grad is None
    assert opt._store.sums.count(None) == 0


@pytest.mark.parametrize("device_name", DEVICES)
def test_peak_memory_of_an_open_cycle_is_lower(device_name):
    # Each mode in its own process (benchmarks/peak_memory.py): 8 x Linear(2048) fp32, K = 4.
    from benchmarks.peak_memory import run_all
    peaks = run_all(device_name, 8, 2048, 4)
    param_bytes = 8 * 2048 * 2048 * 4
    # Default: accumulators + every .grad of the last micro-batch; in backward: + about one layer's.
    assert peaks["gradfuse_backward"] <= peaks["gradfuse"] - 0.4 * param_bytes, peaks
    assert peaks["gradfuse_backward"] <= peaks["torch"] + 0.2 * param_bytes, peaks
    # flat_buffers=True: autograd adds into the flat gradient buffer in place, as torch's loop into .grad.
    assert peaks["gradfuse_flat"] <= peaks["gradfuse"] - 0.4 * param_bytes, peaks
    assert peaks["gradfuse_flat"] <= peaks["torch"] + 0.2 * param_bytes, peaks
