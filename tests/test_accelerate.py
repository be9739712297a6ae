"""Hugging Face Accelerate drives FusedAccumSGD on CPU: accelerator.prepare(model, optimizer,
dataloader), one step() per micro-batch, gradfuse accumulating K of them and clipping. The
parameters must equal a hand-written loop's over the same batches, bit for bit (float64 model)."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

accelerate = pytest.importorskip("accelerate")

from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from gradfuse import FusedAccumSGD, resident_store, PerCycle  # noqa: E402
from problems import BATCH, BATCHES, make_client_problem as make_problem  # noqa: E402
from problems import CLIENT_OPT as OPT  # noqa: E402
from tolerances import assert_bitwise  # noqa: E402



@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    # Accelerator's state is a process-wide singleton; reset as accelerate's own test case does.
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train(net, data, opt_kwargs, accumulation=1, clip_val=None):
    """Accelerate's loop: prepare, then per batch backward, step, zero_grad (inside
    accelerator.accumulate when Accelerate accumulates too). Returns the model and optimizer."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = copy.deepcopy(net)
    opt = FusedAccumSGD(model.parameters(), **opt_kwargs)
    loader = DataLoader(TensorDataset(*data), batch_size=BATCH, shuffle=False)
    model, prepared_opt, loader = accelerator.prepare(model, opt, loader)
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            if clip_val is not None:
                accelerator.clip_grad_norm_(model.parameters(), clip_val)
            prepared_opt.step()
            prepared_opt.zero_grad()
    return model, opt


def plain_loop(net, data, opt_kwargs, per_step=1):
    """The hand-written loop: per_step backward passes of loss / per_step, then opt.step();
    opt.zero_grad()."""
    net = copy.deepcopy(net)
    opt = FusedAccumSGD(net.parameters(), **opt_kwargs)
    x, y = data
    for i in range(BATCHES):
        rows = slice(i * BATCH, (i + 1) * BATCH)
        (nn.functional.mse_loss(net(x[rows]), y[rows]) / per_step).backward()
        if (i + 1) % per_step == 0:
            opt.step()
            opt.zero_grad()
    return net, opt


def assert_same_params(a, b, msg):
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        assert_bitwise(p, q, f"{msg}: parameter {i}")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_accelerate_matches_plain_loop(gen, k):
    # k=5: 12 batches leave a cycle open at the end, as in the plain loop.
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=k)
    model, opt = train(net, data, kwargs)
    ref, ref_opt = plain_loop(net, data, kwargs)
    assert_same_params(model, ref, f"Accelerate K={k}")
    assert opt.micro_step == ref_opt.micro_step == BATCHES % k
    assert float(ref_opt.last_grad_norm) > OPT["max_grad_norm"], "clipping was meant to be active"
    assert not torch.equal(model[0].weight, net[0].weight), "training did not move the weights"


@pytest.mark.parametrize("clip_val", [None, 0.3])
def test_accelerate_with_sums_in_grad(gen, monkeypatch, clip_val):
    # Every tensor keeps its running sum in .grad; accelerator.clip_grad_norm_ at every micro-batch,
    # seen at the first, keeps the sums apart. Bitwise sum_in_grad=False.
    monkeypatch.setattr(resident_store, "RESIDENT_MIN_ELEMENTS", 0)
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=3)
    model, opt = train(net, data, kwargs, clip_val=clip_val)
    apart, _ = train(net, data, dict(kwargs, sum_in_grad=False), clip_val=clip_val)
    assert_same_params(model, apart, f"sum_in_grad, clip_grad_norm_={clip_val}")
    assert opt._store.apart == (clip_val is not None)


def test_accelerate_flat_buffers_matches_plain_loop_and_default_mode(gen):
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=3, flat_buffers=True)
    model, opt = train(net, data, kwargs)
    ref, _ = plain_loop(net, data, kwargs)
    assert_same_params(model, ref, "Accelerate, flat_buffers=True")
    default, _ = plain_loop(net, data, dict(OPT, accumulation_steps=3))
    for p, q in zip(model.parameters(), default.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert not torch.equal(model[0].weight, net[0].weight), "training did not move the weights"


def test_accelerate_gradient_accumulation_steps_with_k1(gen):
    # Accelerate's N with accumulation_steps=1: one update per N batches whose gradient is
    # Accelerate's mean of the N, clipped by gradfuse; bitwise the plain loop's.
    n = 3
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=1)
    model, _ = train(net, data, kwargs, accumulation=n)
    ref, _ = plain_loop(net, data, kwargs, per_step=n)
    assert_same_params(model, ref, f"gradient_accumulation_steps={n}")
    # The same update as gradfuse alone with accumulation_steps=N (summed in another order).
    alone, _ = plain_loop(net, data, dict(OPT, accumulation_steps=n))
    for p, q in zip(model.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_accelerate_gradient_accumulation_steps_with_k_above_1_multiplies(gen):
    # Accelerate's N batches make one gradfuse micro-batch: the clipped mean of N*K batches per update.
    n, k = 2, 3
    net, data = make_problem(gen)
    model, _ = train(net, data, dict(OPT, accumulation_steps=k), accumulation=n)
    alone, _ = plain_loop(net, data, dict(OPT, accumulation_steps=n * k))
    for p, q in zip(model.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert not torch.equal(model[0].weight, net[0].weight), "training did not move the weights"


def test_prepared_scheduler_wrapped_in_per_cycle_advances_once_per_update(gen):
    # Accelerate's prepared scheduler is stepped after every optimizer step (every micro-batch here).
    k = 3
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=k)
    accelerator = accelerate.Accelerator(cpu=True)
    model = copy.deepcopy(net)
    opt = FusedAccumSGD(model.parameters(), **kwargs)
    scheduler = PerCycle(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    loader = DataLoader(TensorDataset(*data), batch_size=BATCH, shuffle=False)
    model, prepared_opt, loader, prepared_scheduler = accelerator.prepare(model, opt, loader, scheduler)
    for x, y in loader:
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        prepared_opt.step()
        prepared_scheduler.step()
        prepared_opt.zero_grad()
    ref = copy.deepcopy(net)
    ref_opt = FusedAccumSGD(ref.parameters(), **kwargs)
    ref_scheduler = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    x, y = data
    for i in range(BATCHES):
        rows = slice(i * BATCH, (i + 1) * BATCH)
        nn.functional.mse_loss(ref(x[rows]), y[rows]).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        if ref_opt.micro_step == 0:
            ref_scheduler.step()
    for i, (p, q) in enumerate(zip(model.parameters(), ref.parameters())):
        assert_bitwise(p, q, f"Accelerate + PerCycle: parameter {i}")
    assert opt.param_groups[0]["lr"] == OPT["lr"] * 0.5 ** (BATCHES // k)
