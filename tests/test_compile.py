"""torch.compile, in every form users write: a compiled model with an eager step(), a compiled
training step holding backward/step/zero_grad, and torch.compile(opt.step). step() and
zero_grad() always run eagerly (one graph break each), so each form trains exactly as eager
does, with no recompilation from one micro-step to the next."""
import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from gradfuse import FusedAccumSGD, resident_store

F64 = torch.float64
K, CYCLES = 3, 3
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=0.01, accumulation_steps=K, max_grad_norm=0.3)


def make_model(device):
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 11), nn.Tanh(), nn.Linear(11, 2)).to(device=device, dtype=F64)


def batches(device):
    gen = torch.Generator().manual_seed(8)
    return [torch.randn(5, 6, generator=gen, dtype=F64).to(device) for _ in range(K * CYCLES)]


def eager_run(device):
    model = make_model(device)
    opt = FusedAccumSGD(model.parameters(), **HYPER)
    for x in batches(device):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def compiled_frames():
    return counters["frames"]["ok"] + counters["frames"].get("total", 0)


def run_and_check(device, train_one, model, opt):
    """Runs every micro-batch through train_one; after the first cycle nothing new may compile."""
    expected = eager_run(device)
    frames_after_first_cycle = None
    for i, x in enumerate(batches(device)):
        train_one(x)
        if i == K - 1:
            frames_after_first_cycle = compiled_frames()
    assert opt.micro_step == 0 and int(opt.skipped_steps) == 0
    assert compiled_frames() == frames_after_first_cycle, "torch.compile recompiled after the first cycle"
    for i, (p, q) in enumerate(zip(model.parameters(), expected)):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-12, msg=f"parameter {i}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("flat_buffers", [False, True], ids=["default", "flat_buffers"])
def test_compiled_model_with_eager_step(device, flat_buffers):
    model = make_model(device)
    compiled = torch.compile(model, backend="aot_eager")
    opt = FusedAccumSGD(model.parameters(), **HYPER, flat_buffers=flat_buffers)

    def train_one(x):
        compiled(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    run_and_check(device, train_one, model, opt)


@pytest.mark.parametrize("flat_buffers", [False, True], ids=["default", "flat_buffers"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_with_backward_step_and_zero_grad(device, backend, flat_buffers):
    model = make_model(device)
    opt = FusedAccumSGD(model.parameters(), **HYPER, flat_buffers=flat_buffers)

    @torch.compile(backend=backend)
    def train_step(x):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss
    run_and_check(device, train_step, model, opt)


def test_compiled_autograd_keeps_the_sums_apart_and_trains_as_eager(device, monkeypatch):
    # Compiled autograd (torch's _enable, as its own tests use it) bumps .grad's version after the
    # post-accumulate-grad hook has run: gradfuse sees a change of .grad at the first micro-batch and
    # keeps the sums apart from .grad (the safe side), so the run trains exactly as eager does.
    from torch._dynamo import compiled_autograd
    monkeypatch.setattr(resident_store, "RESIDENT_MIN_ELEMENTS", 0)
    model = make_model(device)
    opt = FusedAccumSGD(model.parameters(), **HYPER)

    def train_one(x):
        with compiled_autograd._enable(torch.compile(backend="aot_eager")):
            model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    run_and_check(device, train_one, model, opt)
    assert counters["compiled_autograd"]["captures"] > 0, "compiled autograd did not run"
    assert opt._store.apart


def test_compiled_optimizer_step(device):
    model = make_model(device)
    opt = FusedAccumSGD(model.parameters(), **HYPER)
    compiled_step = torch.compile(opt.step, backend="aot_eager")

    def train_one(x):
        model(x).pow(2).mean().backward()
        compiled_step()
        opt.zero_grad()
    run_and_check(device, train_one, model, opt)


def test_fullgraph_around_step_raises_instead_of_training_silently(device):
    model = make_model(device)
    opt = FusedAccumSGD(model.parameters(), **HYPER)
    model(batches(device)[0]).pow(2).mean().backward()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step():
        opt.step()
    with pytest.raises(Exception, match="(?i)skip|disable|graph break"):
        step()
    assert opt.micro_step == 0


def test_ops_trace_under_compile(device):
    # The ops themselves have fake implementations: a compiled norm of a list is the eager norm.
    from gradfuse import ops
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, generator=gen, dtype=F64).to(device) for n in (3, 17, 1)]
    compiled = torch.compile(lambda ts: ops.global_norm(ts, 2.0) * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(tensors), ops.global_norm(tensors, 2.0) * 2)
