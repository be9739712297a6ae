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


@pytest.mark.parametrize("hot", ["policy", "always"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
def test_same_training_as_the_default_mode(device, name, dtype, k, hot, monkeypatch):
    if hot == "always":  # the hot norm on every device and size (its policy enables it on CUDA only)
        from gradfuse import backward_hook_store
        monkeypatch.setattr(backward_hook_store, "takes_norm_hot", lambda device, numel: True)
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
    # Default: the sums stay in .grad, autograd adds into them: torch's own peak (within 5%).
    assert peaks["gradfuse"] <= peaks["torch"] + 0.05 * param_bytes, peaks
    # sum_in_grad=False: accumulators + every .grad of the last micro-batch; in backward: + about one layer's.
    assert peaks["gradfuse_backward"] <= peaks["gradfuse_apart"] - 0.4 * param_bytes, peaks
    assert peaks["gradfuse_backward"] <= peaks["torch"] + 0.2 * param_bytes, peaks
    # flat_buffers=True: autograd adds into the flat gradient buffer in place, as torch's loop into .grad.
    assert peaks["gradfuse_flat"] <= peaks["gradfuse_apart"] - 0.4 * param_bytes, peaks
    assert peaks["gradfuse_flat"] <= peaks["torch"] + 0.2 * param_bytes, peaks


@pytest.fixture
def norm_always_hot(monkeypatch):
    """The hot path on every device and size (its policy enables it on CUDA only)."""
    from gradfuse import backward_hook_store
    monkeypatch.setattr(backward_hook_store, "takes_norm_hot", lambda device, numel: True)


def _step_recording_norm(opt, norms):
    opt.step()
    opt.zero_grad()
    if opt.micro_step == 0:
        norms.append(float(opt.last_grad_norm))


def _train_both_modes(step_fn, k=3, **kw):
    """The same float64 training in the default mode and with accumulate_in_backward=True."""
    results = []
    for in_backward in (False, True):
        g = torch.Generator().manual_seed(7)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        opt = FusedAccumSGD(model.parameters(), lr=0.1, momentum=0.9, accumulation_steps=k, max_grad_norm=0.3,
                            track_param_norms=True, accumulate_in_backward=in_backward, **kw)
        norms = step_fn(model, opt, g)
        results.append(([p.detach().clone() for p in model.parameters()], norms, opt.last_param_norms.clone()))
    (a, norms_a, pn_a), (b, norms_b, pn_b) = results
    assert norms_a == pytest.approx(norms_b, rel=1e-13) and len(norms_a) > 0
    torch.testing.assert_close(pn_a, pn_b, rtol=1e-13, atol=0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)


def test_hot_norm_with_two_backward_passes_in_the_last_micro_batch(norm_always_hot):
    def run(model, opt, g):
        norms = []
        for t in range(9):
            x = torch.randn(4, 6, generator=g, dtype=torch.float64)
            out = model(x).square().sum()
            out.backward(retain_graph=True)
            if t % 3 == 2:
                (out * 0.5).backward()  # the same sums changed again after the hooks took their norm
            _step_recording_norm(opt, norms)
        return norms
    _train_both_modes(run)


def test_hot_norm_with_a_parameter_missing_from_the_last_micro_batch_and_k_raised_mid_cycle(norm_always_hot):
    def run(model, opt, g):
        norms = []
        first = model[0]
        for t in range(10):
            x = torch.randn(4, 6, generator=g, dtype=torch.float64)
            if t % 3 == 2:  # the last micro-batch gives the first layer no gradient: its sum is normed at the end
                with torch.no_grad():
                    hidden = first(x)
                model[2](model[1](hidden)).square().sum().backward()
            else:
                model(x).square().sum().backward()
            if t == 8:  # after the hooks took the norm of what was to be the last micro-batch: one more
                opt.accumulation_steps = 4
            _step_recording_norm(opt, norms)
        return norms
    _train_both_modes(run)
