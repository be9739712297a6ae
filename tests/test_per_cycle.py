"""LR schedulers follow updates: gradfuse.PerCycle advances a scheduler once per accumulation
cycle however often its step() is called (after every micro-batch, as frameworks do), matching
torch's loop that steps the scheduler once per update; an unwrapped per-micro-batch scheduler
warns. Float64 models, bit-for-bit against torch.optim.SGD with manual accumulation."""
import warnings

import pytest
import torch
from torch.optim import lr_scheduler

import gradfuse
from tolerances import assert_bitwise

K, CYCLES = 3, 5
HYPER = dict(lr=0.1, momentum=0.9)
SCHEDULES = {
    "step": lambda opt: lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "lambda": lambda opt: lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e)),
    "one_cycle": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=CYCLES),
}


def data():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64))
            for _ in range(K * CYCLES)]


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 2).double()


def torch_loop(schedule):
    """torch.optim.SGD, gradients summed by hand over K micro-batches, the scheduler stepped once per update."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), **HYPER)
    sched, lrs, sums = SCHEDULES[schedule](opt), [], None
    for t, (x, y) in enumerate(data()):
        grads = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), list(model.parameters()))
        sums = list(grads) if sums is None else [a + g for a, g in zip(sums, grads)]
        if (t + 1) % K == 0:
            for p, total in zip(model.parameters(), sums):
                p.grad = total / K
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            opt.zero_grad()
            sched.step()
            sums = None
    return model, lrs


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_per_cycle_scheduler_stepped_every_micro_batch_matches_torch(schedule):
    model = make_model()
    opt = gradfuse.FusedAccumSGD(model.parameters(), accumulation_steps=K, **HYPER)
    sched, lrs = gradfuse.PerCycle(SCHEDULES[schedule](opt)), []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mid-cycle lr warning: PerCycle changes lr only between cycles
        for x, y in data():
            torch.nn.functional.mse_loss(model(x), y).backward()
            if opt.micro_step == K - 1:
                lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            opt.zero_grad()
            sched.step()  # after every micro-batch, as Lightning's interval="step" does
    expected, expected_lrs = torch_loop(schedule)
    assert lrs == expected_lrs
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]] and sched.last_epoch == CYCLES
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_scheduler_stepped_every_micro_batch_unwrapped_warns_once():
    model = make_model()
    opt = gradfuse.FusedAccumSGD(model.parameters(), accumulation_steps=K, **HYPER)
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with pytest.warns(UserWarning, match="changed from 0.1 to 0.05 inside an accumulation cycle") as record:
        for x, y in data()[:2 * K]:
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    assert sum("inside an accumulation cycle" in str(w.message) for w in record) == 1


def test_per_cycle_state_dict_resumes_with_a_new_optimizer():
    model = make_model()
    opt = gradfuse.FusedAccumSGD(model.parameters(), accumulation_steps=K, **HYPER)
    sched = gradfuse.PerCycle(lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    for x, y in data()[:2 * K]:
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    saved = (opt.state_dict(), sched.state_dict())
    opt2 = gradfuse.FusedAccumSGD(model.parameters(), accumulation_steps=K, **HYPER)
    sched2 = gradfuse.PerCycle(lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5))
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    assert opt2.param_groups[0]["lr"] == 0.025 and sched2.last_epoch == 2
    sched2.step()  # no cycle completed since the load: nothing moves
    assert opt2.param_groups[0]["lr"] == 0.025


def test_per_cycle_refuses_a_torch_optimizer():
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="gradfuse optimizer"):
        gradfuse.PerCycle(lr_scheduler.StepLR(opt, step_size=1))


def test_per_cycle_is_bitwise_the_same_path():
    # The wrapped and the torch-loop runs must update with the same lr at every cycle (checked
    # above); here the two gradfuse runs, scheduler stepped per cycle by hand or per micro-batch
    # through PerCycle, must agree bit for bit.
    runs = []
    for wrap in (False, True):
        model = make_model()
        opt = gradfuse.FusedAccumSGD(model.parameters(), accumulation_steps=K, **HYPER)
        inner = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        sched = gradfuse.PerCycle(inner) if wrap else inner
        for x, y in data():
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if wrap or opt.micro_step == 0:
                sched.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert_bitwise(a, b, "PerCycle vs stepping once per cycle")


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_finish_cycle_updates_with_the_mean_of_an_epochs_last_micro_batches(rule):
    # 7 micro-batches at K=3: two full cycles, then finish_cycle() with the one left, like a torch
    # loop updating at an epoch's end with what its last accumulation has.
    batches = data()[:7]
    model = make_model()
    if rule == "sgd":
        opt = gradfuse.FusedAccumSGD(model.parameters(), accumulation_steps=K, max_grad_norm=0.5, **HYPER)
    else:
        opt = gradfuse.FusedAccumAdamW(model.parameters(), lr=0.01, accumulation_steps=K, max_grad_norm=0.5)
    for x, y in batches:
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert opt.micro_step == 1 and opt.finish_cycle() and opt.micro_step == 0 and opt.cycles_completed == 3
    assert not opt.finish_cycle()
    ref = make_model()
    params = list(ref.parameters())
    ref_opt = torch.optim.SGD(params, **HYPER) if rule == "sgd" else torch.optim.AdamW(params, lr=0.01)
    for start in range(0, len(batches), K):
        chunk = batches[start:start + K]
        sums = None
        for x, y in chunk:
            grads = torch.autograd.grad(torch.nn.functional.mse_loss(ref(x), y), list(ref.parameters()))
            sums = list(grads) if sums is None else [a + g for a, g in zip(sums, grads)]
        for p, total in zip(ref.parameters(), sums):
            p.grad = total / len(chunk)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_update_post_hooks_run_once_per_update_step_hooks_once_per_micro_batch():
    model = make_model()
    opt = gradfuse.FusedAccumSGD(model.parameters(), accumulation_steps=K, **HYPER)
    calls = {"step": 0, "update": 0}
    opt.register_step_post_hook(lambda o, args, kwargs: calls.__setitem__("step", calls["step"] + 1))
    handle = opt.register_update_post_hook(lambda o: calls.__setitem__("update", calls["update"] + 1))
    for x, y in data()[:2 * K + 1]:
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert calls == {"step": 2 * K + 1, "update": 2}
    opt.finish_cycle()
    assert calls["update"] == 3
    handle.remove()
    for x, y in data()[:K]:
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert calls["update"] == 3


def test_a_run_whose_every_cycle_is_skipped_warns_once():
    model = make_model()
    opt = gradfuse.FusedAccumSGD(model.parameters(), accumulation_steps=2, **HYPER)
    opt.skip_warning_interval = 3

    def cycle(bad):
        for x, y in data()[:2]:
            loss = torch.nn.functional.mse_loss(model(x), y)
            (loss * float("nan") if bad else loss).backward()
            opt.step()
            opt.zero_grad()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(12):
            cycle(bad=i % 3 != 0)  # progress in every window: no warning
    with pytest.warns(UserWarning, match="training is not progressing") as record:
        for _ in range(12):
            cycle(bad=True)
    assert sum("not progressing" in str(w.message) for w in record) == 1


def test_momentum_changed_inside_a_cycle_warns_too():
    model = make_model()
    opt = gradfuse.FusedAccumSGD(model.parameters(), accumulation_steps=K, **HYPER)
    with pytest.warns(UserWarning, match=r"\['momentum'\] changed from 0.9 to 0.5 inside an accumulation cycle"):
        for i, (x, y) in enumerate(data()[:K]):
            if i == 1:
                opt.param_groups[0]["momentum"] = 0.5
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()


def test_finish_cycle_refuses_flat_buffers_before_anything_changes():
    model = make_model()
    opt = gradfuse.FusedAccumSGD(model.parameters(), accumulation_steps=K, flat_buffers=True, **HYPER)
    x, y = data()[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="without flat_buffers=True"):
        opt.finish_cycle()
    assert opt.micro_step == 1
    for p, b in zip(model.parameters(), before):
        assert_bitwise(p.detach(), b, "a refused finish_cycle changed a parameter")
