"""The default mode alone keeps each running sum in its parameter's .grad between micro-batches
(gradfuse/resident_store.py): autograd adds into it in place, as in torch's own accumulation loop.
Checked with real autograd against torch.optim + clip_grad_norm_, against sum_in_grad=False (bit for
bit), and for every way a user or framework may touch .grad between backward and step()."""
import copy

import pytest
import torch

import gradfuse
from gradfuse import resident_store
from tolerances import assert_close

K = 3


@pytest.fixture
def every_tensor(monkeypatch):
    """Small test models: every tensor large enough to keep its sum in .grad."""
    monkeypatch.setattr(resident_store, "RESIDENT_MIN_ELEMENTS", 0)


def make_model(dtype, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(device, dtype)


def batches(n, dtype, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 9, generator=gen, dtype=torch.float64).to(device, dtype) for _ in range(n)]


def loss_of(model, x):
    return model(x).pow(2).mean()


def clip_each(model):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)


def gradfuse_run(dtype, rule="sgd", edit=None, n=4 * K, device="cpu", **kwargs):
    model = make_model(dtype, device=device)
    opt = make_opt(model, rule, **kwargs)
    for x in batches(n, dtype, device=device):
        loss_of(model, x).backward()
        if edit is not None:
            edit(model, opt)
        opt.step()
        opt.zero_grad()
    return model, opt


def make_opt(model, rule, **kwargs):
    if rule == "sgd":
        return gradfuse.FusedAccumSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01,
                                      accumulation_steps=K, max_grad_norm=0.3, **kwargs)
    return gradfuse.FusedAccumAdamW(model.parameters(), lr=0.01, weight_decay=0.1, accumulation_steps=K,
                                    max_grad_norm=0.3, **kwargs)


def torch_run(dtype, rule="sgd", edit_each=False, n=4 * K):
    """torch's loop in float64: each micro-batch's gradient (edited alone where gradfuse documents it),
    summed, averaged, clipped, then torch.optim's step."""
    model = make_model(dtype).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01) if rule == "sgd" else \
        torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    sums = None
    for i, x in enumerate(batches(n, dtype)):
        loss_of(model, x.double()).backward()
        if edit_each:
            clip_each(model)
        grads = [p.grad.clone() for p in model.parameters()]
        sums = grads if sums is None else [s + g for s, g in zip(sums, grads)]
        opt.zero_grad()
        if (i + 1) % K == 0:
            for p, s in zip(model.parameters(), sums):
                p.grad = s / K
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
            opt.step()
            opt.zero_grad()
            sums = None
    return model


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(a, b):
    for x, y in zip(params_of(a), params_of(b)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trains_like_torch_and_bitwise_like_sums_apart(every_tensor, device, dtype, rule):
    model, opt = gradfuse_run(dtype, rule, device=device)
    assert type(opt._store) is resident_store.ResidentSumStore and not opt._store.apart
    expected = torch_run(dtype, rule)
    for p, q in zip(params_of(model), params_of(expected)):
        assert_close(p.cpu(), q.to(dtype), dtype, "after 4 cycles")
    apart, _ = gradfuse_run(dtype, rule, device=device, sum_in_grad=False)
    assert_bitwise(model, apart)


def test_grad_holds_the_running_sum_between_micro_batches(every_tensor, device):
    model = make_model(torch.float32, device=device)
    opt = make_opt(model, "sgd")
    xs = batches(K, torch.float32, device=device)
    loss_of(model, xs[0]).backward()
    first = [p.grad.clone() for p in model.parameters()]
    opt.step()
    opt.zero_grad()
    held = [p.grad for p in model.parameters()]
    assert all(h is not None for h in held)
    for h, f in zip(held, first):
        assert torch.equal(h, f)
    loss_of(model, xs[1]).backward()  # autograd adds into the same tensor, in place
    assert all(p.grad is h for p, h in zip(model.parameters(), held))
    opt.step()
    opt.zero_grad(set_to_none=False)  # kept, not zeroed: it is the cycle's sum
    assert all(p.grad is h for p, h in zip(model.parameters(), held))
    loss_of(model, xs[2]).backward()
    opt.step()  # the cycle's end: the update
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_small_tensors_keep_their_sums_apart(monkeypatch):
    monkeypatch.setattr(resident_store, "RESIDENT_MIN_ELEMENTS", 64)
    big, small = torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(63))
    opt = gradfuse.FusedAccumSGD([big, small], lr=0.1, accumulation_steps=2)
    (big.sum() + small.sum()).backward()
    opt.step()
    opt.zero_grad()
    assert big.grad is not None and small.grad is None


def test_a_clip_at_every_micro_batch_keeps_each_micro_batch_apart(every_tensor):
    """Lightning's gradient_clip_val under gradfuse's K clips each micro-batch's gradient alone."""
    model, opt = gradfuse_run(torch.float64, edit=lambda m, o: clip_each(m))
    assert opt._store.apart
    expected = torch_run(torch.float64, edit_each=True)
    for p, q in zip(params_of(model), params_of(expected)):
        assert_close(p, q, torch.float64, "per-micro-batch clip")
    apart, _ = gradfuse_run(torch.float64, edit=lambda m, o: clip_each(m), sum_in_grad=False)
    assert_bitwise(model, apart)


def test_an_edit_of_a_resident_sum_raises_before_anything_changes(every_tensor):
    model = make_model(torch.float64)
    opt = make_opt(model, "sgd")
    xs = batches(2 * K, torch.float64)
    for x in xs[:K + 1]:  # one whole cycle, then the next one's first micro-batch
        loss_of(model, x).backward()
        opt.step()
        opt.zero_grad()
    loss_of(model, xs[K + 1]).backward()
    clip_each(model)  # only now: this .grad is the sum of two micro-batches
    params, buffers = params_of(model), [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="modified in place.*sum_in_grad=False"):
        opt.step()
    assert opt.micro_step == 1
    for p, before, buffer in zip(model.parameters(), params, buffers):
        assert torch.equal(p, before) and torch.equal(opt.state[p]["momentum_buffer"], buffer)


def second_backward_done():
    """A cycle's first micro-batch stepped (its sum now .grad), the second one's backward done, no step()."""
    model = make_model(torch.float64)
    opt = make_opt(model, "sgd")
    xs = batches(2, torch.float64)
    loss_of(model, xs[0]).backward()
    opt.step()
    opt.zero_grad()
    loss_of(model, xs[1]).backward()
    return model, opt


@pytest.mark.parametrize("how", ["module_zero_grad", "assign", "set_none"])
def test_grad_replaced_after_the_backward_raises(every_tensor, how):
    model, opt = second_backward_done()
    for p in model.parameters():
        if how == "module_zero_grad":
            model.zero_grad()
        elif how == "assign":
            p.grad = p.grad.clamp(-0.01, 0.01)
        else:
            p.grad = None
    with pytest.raises(RuntimeError, match="replaced or removed"):
        opt.step()


def test_discarding_a_backward_with_zero_grad_raises_while_sums_are_in_grad(every_tensor):
    model, opt = second_backward_done()
    with pytest.raises(RuntimeError, match="zero_grad\\(\\) cannot discard it"):
        opt.zero_grad()
    for step in (opt.state_dict, lambda: copy.deepcopy(opt), opt.finish_cycle):
        with pytest.raises(RuntimeError, match="already added its gradient"):
            step()
    opt.step()  # counted as the micro-batch it is
    assert opt.micro_step == 2


def test_discarding_a_first_micro_batch_keeps_sums_apart_and_drops_it(every_tensor):
    """The documented meaning of zero_grad() between backward and step(): the batch is dropped."""
    def run(sum_in_grad):
        model = make_model(torch.float64)
        opt = make_opt(model, "sgd", sum_in_grad=sum_in_grad)
        for i, x in enumerate(batches(3 * K + 1, torch.float64)):
            loss_of(model, x).backward()
            if i == 0:
                opt.zero_grad()  # a bad batch, dropped
                continue
            opt.step()
            opt.zero_grad()
        return model, opt
    model, opt = run(True)
    assert opt._store.apart
    assert_bitwise(model, run(False)[0])


def test_module_zero_grad_before_each_backward_is_added_as_usual(every_tensor):
    """HF Trainer's model.zero_grad(): .grad is replaced before the backward, the sum stays ours."""
    def run(sum_in_grad):
        model = make_model(torch.float64)
        opt = make_opt(model, "sgd", sum_in_grad=sum_in_grad)
        for x in batches(3 * K, torch.float64):
            model.zero_grad()
            loss_of(model, x).backward()
            opt.step()
        return model
    assert_bitwise(run(True), run(False))


def test_no_zero_grad_inside_a_cycle_accumulates_like_torch(every_tensor):
    """Forgetting zero_grad() between micro-batches: autograd adds into the resident sum, as torch's loop."""
    def run(zero_every_step):
        model = make_model(torch.float64)
        opt = make_opt(model, "sgd")
        for x in batches(3 * K, torch.float64):
            loss_of(model, x).backward()
            opt.step()
            if zero_every_step or opt.micro_step == 0:
                opt.zero_grad()
        return model
    assert_bitwise(run(False), run(True))


def test_module_zero_grad_in_place_mid_cycle_raises(every_tensor):
    model = make_model(torch.float64)
    opt = make_opt(model, "sgd")
    xs = batches(2, torch.float64)
    loss_of(model, xs[0]).backward()
    opt.step()
    model.zero_grad(set_to_none=False)  # zeroes the running sum in place
    loss_of(model, xs[1]).backward()
    with pytest.raises(RuntimeError, match="modified in place"):
        opt.step()


def test_create_graph_backward(every_tensor):
    """backward(create_graph=True) rebuilds .grad out of place: apart from the first micro-batch on;
    raised where it meets a sum already in .grad."""
    model, opt = gradfuse_run(torch.float64, n=2 * K)
    x = batches(1, torch.float64, seed=5)[0]
    loss_of(model, x).backward()
    opt.step()
    opt.zero_grad()
    loss_of(model, x).backward(create_graph=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()

    model = make_model(torch.float64)
    opt = make_opt(model, "sgd")
    loss_of(model, x).backward(create_graph=True)
    opt.step()
    opt.zero_grad()
    assert opt._store.apart


def test_grad_scaler_keeps_sums_apart(every_tensor):
    model = make_model(torch.float32)
    opt = make_opt(model, "sgd")
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for x in batches(2 * K, torch.float32):
        scaler.scale(loss_of(model, x)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt._store.apart


@pytest.mark.parametrize("at", range(1, K))
def test_checkpoint_and_copy_mid_cycle_resume_bitwise(every_tensor, at):
    xs = batches(3 * K, torch.float64)
    model = make_model(torch.float64)
    opt = make_opt(model, "sgd")
    for x in xs[:K + at]:
        loss_of(model, x).backward()
        opt.step()
        opt.zero_grad()
    saved, saved_params = copy.deepcopy(opt.state_dict()), params_of(model)
    twin_model, twin = copy.deepcopy((model, opt))  # one memo: the copy updates the copied model
    for x in xs[K + at:]:
        loss_of(model, x).backward()
        opt.step()
        opt.zero_grad()

    loaded_model = make_model(torch.float64)
    with torch.no_grad():
        for p, q in zip(loaded_model.parameters(), saved_params):
            p.copy_(q)
    loaded = make_opt(loaded_model, "sgd")
    loaded.load_state_dict(saved)
    for m, o in ((loaded_model, loaded), (twin_model, twin)):
        for x in xs[K + at:]:
            loss_of(m, x).backward()
            o.step()
            o.zero_grad()
        assert_bitwise(model, m)


def test_sum_in_grad_is_checked_shown_and_copied():
    model = make_model(torch.float32)
    with pytest.raises(TypeError, match="sum_in_grad must be a bool"):
        gradfuse.FusedAccumSGD(model.parameters(), sum_in_grad="no")
    with pytest.raises(ValueError, match="sum_in_grad is optimizer-wide"):
        gradfuse.FusedAccumSGD([{"params": model.parameters(), "sum_in_grad": False}])
    opt = gradfuse.FusedAccumSGD(model.parameters(), accumulation_steps=2, sum_in_grad=False)
    assert "sum_in_grad: False" in repr(opt)
    twin = copy.deepcopy(opt)
    assert twin.sum_in_grad is False and type(twin._store) is type(opt._store)


@pytest.mark.parametrize("freeze", [False, True])
def test_param_groups_edited_mid_cycle(every_tensor, freeze):
    """A group added mid-cycle rebuilds the store: sums in .grad stay there; a parameter frozen by
    then is no longer watched, so its sum leaves .grad and is kept apart (nothing added twice)."""
    def run(sum_in_grad):
        model = make_model(torch.float64)
        extra = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
        opt = make_opt(model, "sgd", sum_in_grad=sum_in_grad)
        for i, x in enumerate(batches(3 * K, torch.float64)):
            if i == K + 1:
                if freeze:
                    model[0].weight.requires_grad_(False)
                opt.add_param_group(dict(params=[extra], lr=0.05))
            (loss_of(model, x) + (extra * x.sum()).sum()).backward()
            opt.step()
            opt.zero_grad()
        return model, extra, opt
    model, extra, opt = run(True)
    apart, extra_apart, _ = run(False)
    assert_bitwise(model, apart)
    assert torch.equal(extra, extra_apart)
    assert opt._store.watched and not opt._store.apart


def random_training(seed, sum_in_grad):
    """A random but legitimate loop (seeded): K per run; per micro-batch zero_grad before or after,
    by the optimizer or the module, one or two backward passes, sometimes a parameter without a
    gradient, a clip of every micro-batch or none; sometimes a mid-cycle checkpoint resumed into a
    fresh model and optimizer, sometimes finish_cycle()."""
    rng = torch.Generator().manual_seed(seed)

    def pick(n):
        return int(torch.randint(0, n, (), generator=rng))
    k, clips = 1 + pick(4), pick(2) == 1
    model = make_model(torch.float64, seed=seed)
    opt = make_opt(model, "sgd", sum_in_grad=sum_in_grad)
    opt.accumulation_steps = k
    zeroed = True  # gradients were zeroed since the last step()
    for x in batches(12, torch.float64, seed=seed):
        if not zeroed:  # zero_grad(); backward; step(), by the optimizer or the module
            (opt.zero_grad if pick(2) else model.zero_grad)()
        for _ in range(1 + pick(2)):
            out = model(x) if pick(4) else model[1](model[0](x)).sum(1, keepdim=True)  # model[2] left out
            out.pow(2).mean().backward()
        if clips:
            clip_each(model)
        opt.step()
        zeroed = pick(2) == 1  # or backward; step(); zero_grad()
        if zeroed:
            opt.zero_grad()
        if opt.micro_step and pick(5) == 0:  # resume mid-cycle in a fresh model and optimizer
            saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
            model = make_model(torch.float64, seed=seed + 1)
            model.load_state_dict(weights)
            opt = make_opt(model, "sgd", sum_in_grad=sum_in_grad)
            opt.accumulation_steps = k
            opt.load_state_dict(saved)
        elif opt.micro_step and pick(6) == 0:
            opt.finish_cycle()
    return model


@pytest.mark.parametrize("seed", range(24))
def test_random_legitimate_loops_train_as_with_the_sums_apart(every_tensor, seed):
    # Not bit for bit: two backward passes in one micro-batch add into a sum in .grad one after the
    # other, as torch's loop does ((S + a) + b), where a sum apart takes their sum (S + (a + b)).
    for p, q in zip(params_of(random_training(seed, True)), params_of(random_training(seed, False))):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("end", ["finish_cycle", "load_closed_checkpoint"])
def test_a_cycle_ended_after_zero_grad_leaves_no_spent_sum_in_grad(every_tensor, end):
    """backward; step(); zero_grad() keeps the sum in .grad; a cycle then ended without a backward
    (finish_cycle(), loading a checkpoint taken between cycles) must leave .grad as zero_grad() left it."""
    def run(sum_in_grad):
        model = make_model(torch.float64)
        opt = make_opt(model, "sgd", sum_in_grad=sum_in_grad)
        closed = copy.deepcopy(opt.state_dict())
        for i, x in enumerate(batches(2 * K, torch.float64)):
            loss_of(model, x).backward()
            opt.step()
            opt.zero_grad()
            if i == 1:
                if end == "finish_cycle":
                    opt.finish_cycle()
                else:
                    opt.load_state_dict(closed)
                assert all(p.grad is None for p in model.parameters())
        return model
    assert_bitwise(run(True), run(False))
