"""FusedAccumSGD end to end: against the float64 reference, against torch.optim.SGD with manual
accumulation + clip_grad_norm_, checkpoints, schedulers and hyperparameter validation."""
import copy
import math

import pytest
import torch
from torch import nn

import harness
import reference as ref
from data import DTYPES, EDGE_SHAPES, SMALL_SHAPES, generator, randn
from gradfuse import FusedAccumSGD, resident_store
from problems import batches, make_model
from tolerances import assert_bitwise, assert_close, assert_scalar_close

F32, F64 = torch.float32, torch.float64


# ------------------------------------------------------------------ vs the float64 reference
@pytest.mark.parametrize("case", range(16))
def test_random_configurations_match_reference(device, case):
    gen = generator(1000 + case)
    n = int(torch.randint(1, 6, (1,), generator=gen))
    shapes = [SMALL_SHAPES[int(torch.randint(0, len(SMALL_SHAPES), (1,), generator=gen))] for _ in range(n)]
    dtypes = [DTYPES[int(torch.randint(0, 4, (1,), generator=gen))] for _ in range(n)]
    spec = harness.random_spec(gen, shapes, dtypes)
    harness.run_against_reference(spec, device, gen)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_sizes_every_dtype(device, seed, dtype, norm_type):
    # Every edge size (empty, 0-dim, 1, odd, >16384) in one optimizer, clip active, momentum on.
    gen = generator(seed)
    groups = [dict(params=[0, 2, 4, 6, 8], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01,
                   nesterov=False, maximize=False),
              dict(params=[1, 3, 5, 7], lr=0.05, momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=True,
                   maximize=True)]
    spec = dict(shapes=EDGE_SHAPES, dtypes=[dtype] * len(EDGE_SHAPES), groups=groups, k=2, cycles=3,
                missing=set(), bad={}, clip="active", norm_type=norm_type)
    _, model, _, _ = harness.run_against_reference(spec, device, gen)
    assert all(norm > 0.05 for norm in model.norms), "clipping was meant to be active"


@pytest.mark.parametrize("accum_dtype", [None, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_mixed_dtypes_and_k(device, seed, k, accum_dtype):
    gen = generator(seed)
    dtypes = [F32, F64, torch.float16, torch.bfloat16, F32]
    if accum_dtype is not None:
        dtypes = [F32, torch.float16, torch.bfloat16, F32]
    shapes = [(33,), (7,), (3, 5), (1023,), ()][:len(dtypes)]
    groups = [dict(params=list(range(len(dtypes))), lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.05,
                   nesterov=True, maximize=False)]
    spec = dict(shapes=shapes, dtypes=dtypes, groups=groups, k=k, cycles=3, missing={(0, 1)}, bad={},
                clip="inactive", norm_type=2.0, accum_dtype=accum_dtype)
    harness.run_against_reference(spec, device, gen)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("k", [1, 3])
def test_nonfinite_cycle_is_skipped_then_training_continues(device, seed, bad, k):
    gen = generator(seed)
    groups = [dict(params=[0, 1, 2], lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=False,
                   maximize=False)]
    # The bad value arrives in the last micro-step of cycle 2 (after momentum exists).
    spec = dict(shapes=[(7,), (40,), ()], dtypes=[F32, F64, torch.bfloat16], groups=groups, k=k, cycles=4,
                missing=set(), bad={2 * k - 1: (1, bad)}, clip="active", norm_type=2.0)
    opt, model, params, _ = harness.run_against_reference(spec, device, gen)
    assert int(opt.skipped_steps) == 1 and model.skipped_steps == 1
    assert sum(not math.isfinite(n) for n in model.norms) == 1


def test_skipped_cycle_leaves_params_and_momentum_bitwise(device, gen):
    p = randn((50,), F32, device, gen)
    opt = FusedAccumSGD([p], lr=0.1, momentum=0.9, weight_decay=0.1, accumulation_steps=2, max_grad_norm=1.0)
    for _ in range(2):
        p.grad = randn((50,), F32, device, gen)
        opt.step()
    before, buf = p.clone(), opt.state[p]["momentum_buffer"].clone()
    for value in (1.0, math.nan):
        p.grad = randn((50,), F32, device, gen)
        p.grad[3] = value
        opt.step()
    assert_bitwise(p, before, "skipped cycle changed the param")
    assert_bitwise(opt.state[p]["momentum_buffer"], buf, "skipped cycle changed momentum")
    assert int(opt.skipped_steps) == 1 and math.isnan(float(opt.last_grad_norm))
    assert opt.micro_step == 0
    p.grad = randn((50,), F32, device, gen)  # the next cycle starts clean (no NaN left over)
    opt.step()
    p.grad = randn((50,), F32, device, gen)
    opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p, before)


def test_skipped_first_cycle_creates_no_momentum_in_state_dict(device, gen):
    p = randn((5,), F32, device, gen)
    opt = FusedAccumSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.full((5,), math.inf, device=device)
    opt.step()
    assert opt.state_dict()["state"] == {}, "SGD has no momentum buffer before its first real update"


def test_error_if_nonfinite_raises_and_leaves_params(device, gen):
    p = randn((5,), F32, device, gen)
    opt = FusedAccumSGD([p], lr=0.1, error_if_nonfinite=True, skip_nonfinite=False)
    before = p.clone()
    p.grad = torch.full((5,), math.nan, device=device)
    with pytest.raises(RuntimeError, match="error_if_nonfinite"):
        opt.step()
    assert_bitwise(p, before, "params changed although the step raised")


def test_param_without_grad_in_whole_cycle_is_untouched(device, gen):
    a, b = randn((8,), F32, device, gen), randn((8,), F32, device, gen)
    opt = FusedAccumSGD([a, b], lr=0.1, momentum=0.9, weight_decay=0.5, accumulation_steps=2)
    b0 = b.clone()
    for _ in range(4):
        a.grad = randn((8,), F32, device, gen)
        opt.step()
        opt.zero_grad()
    assert_bitwise(b, b0, "weight decay/momentum touched a param that never had a gradient")
    state = opt.state.get(b, {})  # a zero placeholder buffer is allowed while never written
    assert "momentum_buffer" not in state or not bool(state["momentum_initialized"])
    assert 1 not in opt.state_dict()["state"], "SGD would have no momentum buffer for it"


def test_micro_batch_without_any_gradient_counts_toward_k(device, gen):
    # MoE experts without tokens, frozen phases, FSDP2 without gradient sync: a missing gradient is zero.
    p = randn((5,), F64, device, gen)
    p0 = p.clone()
    g1, g3 = randn((5,), F64, device, gen), randn((5,), F64, device, gen)
    opt = FusedAccumSGD([p], lr=0.1, accumulation_steps=3, max_grad_norm=0.05)
    for g in (g1, None, g3):
        p.grad = None if g is None else g.clone()
        opt.step()
        opt.zero_grad()
    mean = (g1 + g3) / 3
    expected = p0 - 0.1 * mean * min(1.0, 0.05 / (float(mean.norm()) + 1e-6))
    assert_close(p, expected, F64, "micro-batch 2 had no gradient and must count as zero")
    assert opt.micro_step == 0


def test_cycle_without_any_gradient_updates_nothing_and_warns_once(device, gen):
    p = randn((3,), F32, device, gen)
    p0 = p.clone()
    opt = FusedAccumSGD([p], lr=0.1, momentum=0.9, weight_decay=0.1, accumulation_steps=2, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match="without any gradient"):
        opt.step()
        opt.step()
    assert_bitwise(p, p0, "a cycle without gradients must not decay or move the parameter")
    assert float(opt.last_grad_norm) == 0.0 and opt.micro_step == 0
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per optimizer, not once per cycle
        opt.step()
        opt.step()
    p.grad = randn((3,), F32, device, gen)
    opt.step()
    assert opt.micro_step == 1, "training goes on normally afterwards"


# ------------------------------------------------------------------ vs torch.optim.SGD on a real model
def mean_gradients_into_grad(model, sgd, micro_batches):
    """Manual accumulation: p.grad = the mean of the micro-batches' gradients."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for x, y in micro_batches:
        sgd.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for t, p in zip(total, params):
            t.add_(p.grad)
    for t, p in zip(total, params):
        p.grad = t / len(micro_batches)


def torch_reference_run(model, data, k, sgd_kwargs, max_norm, norm_type, scheduler=None):
    """torch.optim.SGD + manual accumulation (sum of grads / K) + clip_grad_norm_."""
    sgd = torch.optim.SGD(model.parameters(), **sgd_kwargs)
    sched = scheduler(sgd) if scheduler else None
    params = list(model.parameters())
    norms, history = [], []
    for c in range(len(data) // k):
        mean_gradients_into_grad(model, sgd, data[c * k:(c + 1) * k])
        norms.append(nn.utils.clip_grad_norm_(params, max_norm if max_norm else math.inf, norm_type))
        sgd.step()
        if sched:
            sched.step()
        history.append([p.detach().clone() for p in params])
    return norms, history


def fused_run(model, data, k, sgd_kwargs, max_norm, norm_type, order, scheduler=None):
    opt = FusedAccumSGD(model.parameters(), accumulation_steps=k, max_grad_norm=max_norm, norm_type=norm_type,
                        **sgd_kwargs)
    sched = scheduler(opt) if scheduler else None
    norms, history = [], []
    for x, y in data:
        boundary = opt.sync_gradients
        if order == "zero-first":
            opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if order == "zero-last":
            opt.zero_grad()
        elif order == "zero-last-keep":
            opt.zero_grad(set_to_none=False)
        if boundary:
            norms.append(opt.last_grad_norm.clone())
            if sched:
                sched.step()
            history.append([p.detach().clone() for p in model.parameters()])
    return norms, history


def assert_runs_match(fused, reference, dtype):
    (f_norms, f_hist), (r_norms, r_hist) = fused, reference
    assert len(f_hist) == len(r_hist) > 0
    for c, (fn, rn) in enumerate(zip(f_norms, r_norms)):
        assert_scalar_close(fn, float(rn), dtype, f"cycle {c}: last_grad_norm vs clip_grad_norm_")
    for c, (fp, rp) in enumerate(zip(f_hist, r_hist)):
        for i, (a, b) in enumerate(zip(fp, rp)):
            assert_close(a, b.double(), dtype, f"cycle {c}: param {i}")


SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02, maximize=True),
]


@pytest.mark.parametrize("order", ["zero-first", "zero-last", "zero-last-keep"])
@pytest.mark.parametrize("config", range(len(SGD_CONFIGS)))
@pytest.mark.parametrize("k,max_norm,norm_type", [(1, None, 2.0), (3, 0.05, 2.0), (2, 0.02, math.inf)])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_matches_torch_sgd_with_manual_accumulation(device, dtype, k, max_norm, norm_type, config, order):
    data = batches(7, 4 * k, dtype, device)
    expected = torch_reference_run(make_model(3, dtype, device), data, k, SGD_CONFIGS[config], max_norm, norm_type)
    model = make_model(3, dtype, device)
    start = [p.detach().clone() for p in model.parameters()]
    got = fused_run(model, data, k, SGD_CONFIGS[config], max_norm, norm_type, order)
    assert_runs_match(got, expected, dtype)
    assert all(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
    if max_norm:
        assert any(float(n) > max_norm for n in expected[0]), "clipping was meant to be active"


@pytest.mark.parametrize("k", [1, 3])
def test_plain_accumulation_runs_no_norm_pass(device, k):
    """No clipping and no non-finite handling: torch.optim.SGD + accumulation exactly, no norm."""
    data = batches(11, 3 * k, F32, device)
    config = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    _, expected = torch_reference_run(make_model(5, F32, device), data, k, config, None, 2.0)
    model = make_model(5, F32, device)
    opt = FusedAccumSGD(model.parameters(), accumulation_steps=k, skip_nonfinite=False, **config)
    for c in range(3):
        for x, y in data[c * k:(c + 1) * k]:
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        assert opt.last_grad_norm is None  # nothing consumed a norm, so none was computed
        for i, (a, b) in enumerate(zip(model.parameters(), expected[c])):
            assert_close(a, b.double(), F32, f"cycle {c}: param {i}")
    assert opt._norms.states == {}, "a norm accumulator was used although nothing needed it"


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1 + epoch)),
], ids=["StepLR", "LambdaLR"])
def test_lr_scheduler(device, make_scheduler):
    cfg = dict(lr=0.2, momentum=0.9)
    data = batches(11, 12, F64, device)
    expected = torch_reference_run(make_model(5, F64, device), data, 2, cfg, None, 2.0, make_scheduler)
    got = fused_run(make_model(5, F64, device), data, 2, cfg, None, 2.0, "zero-last", make_scheduler)
    assert_runs_match(got, expected, F64)


def test_lr_as_tensor(device):
    data = batches(13, 6, F64, device)
    expected = torch_reference_run(make_model(5, F64, device), data, 2, dict(lr=0.1, momentum=0.5), None, 2.0)
    tensor_cfg = dict(lr=torch.tensor(0.1, dtype=F64, device=device), momentum=0.5)
    got = fused_run(make_model(5, F64, device), data, 2, tensor_cfg, None, 2.0, "zero-last")
    assert_runs_match(got, expected, F64)


def test_lr_tensor_with_scheduler(device):
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    data = batches(17, 6, F64, device)
    expected = torch_reference_run(make_model(5, F64, device), data, 2, dict(lr=0.1), None, 2.0, sched)
    got = fused_run(make_model(5, F64, device), data, 2, dict(lr=torch.tensor(0.1, dtype=F64)), None, 2.0,
                    "zero-last", sched)
    assert_runs_match(got, expected, F64)


def test_sync_gradients_and_micro_step_sequence(device, gen):
    p = randn((3,), F32, device, gen)
    opt = FusedAccumSGD([p], lr=0.1, accumulation_steps=3)
    seen = []
    for _ in range(7):
        seen.append((opt.sync_gradients, opt.micro_step))
        p.grad = randn((3,), F32, device, gen)
        opt.step()
    assert seen == [(False, 0), (False, 1), (True, 2)] * 2 + [(False, 0)]
    assert FusedAccumSGD([p], lr=0.1).sync_gradients is True  # K=1: every step is a boundary
    assert FusedAccumSGD([p], lr=0.1).last_grad_norm is None


def test_step_closure_returns_loss(device):
    model = make_model(1, F32, device)
    (x, y), = batches(2, 1, F32, device)
    opt = FusedAccumSGD(model.parameters(), lr=0.1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.grad_fn is not None  # the closure's own loss tensor
    assert loss.item() == nn.functional.mse_loss(make_model(1, F32, device)(x), y).item()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------ checkpoints
def _opt_for(params, k):
    return FusedAccumSGD([dict(params=params[:2], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
                          dict(params=params[2:], lr=0.05, momentum=0.8, nesterov=True)],
                         accumulation_steps=k, max_grad_norm=0.5)


def _state_tensors(opt, params):
    out = [p.detach().clone() for p in params]
    out += [opt.state[p]["momentum_buffer"].clone() for p in params if "momentum_buffer" in opt.state.get(p, {})]
    out += [opt.skipped_steps.clone()] + ([opt.last_grad_norm.clone()] if opt.last_grad_norm is not None else [])
    return out


@pytest.mark.parametrize("via_file", [False, True], ids=["memory", "torch.save"])
@pytest.mark.parametrize("k", [3, 4])
def test_state_dict_mid_cycle_resumes_bit_identically(device, seed, tmp_path, k, via_file):
    shapes, dtypes = [(7,), (3, 4), (), (20000,)], [F32, torch.bfloat16, F64, torch.float16]
    for position in range(k):  # save after `position` micro-steps of the second cycle
        gen = generator(seed + position)
        params = [randn(s, d, device, gen) for s, d in zip(shapes, dtypes)]
        grads = [[randn(s, d, device, gen) for s, d in zip(shapes, dtypes)] for _ in range(3 * k)]
        grads[k][1] = None  # a missing gradient mid-cycle
        grads[k + 1][2][()] = math.inf if k == 3 else 1.0  # for k=3: the saved cycle is skipped
        opt = _opt_for(params, k)

        def feed(o, ps, t):
            for p, g in zip(ps, grads[t]):
                p.grad = None if g is None else g.clone()
            o.step()
            o.zero_grad()

        for t in range(k + position):
            feed(opt, params, t)
        saved = copy.deepcopy(opt.state_dict())
        if via_file:
            torch.save(opt.state_dict(), tmp_path / "opt.pt")
            saved = torch.load(tmp_path / "opt.pt", weights_only=False)
        clones = [p.clone() for p in params]
        restored = _opt_for(clones, k)
        restored.load_state_dict(saved)
        assert restored.micro_step == opt.micro_step == position
        for t in range(k + position, 3 * k):
            feed(opt, params, t)
            feed(restored, clones, t)
        for a, b in zip(_state_tensors(opt, params), _state_tensors(restored, clones)):
            assert_bitwise(a, b, f"resume after micro-step {position} diverged")
        assert not torch.equal(params[0], clones[0].new_tensor(0.0)) and int(opt.skipped_steps) == (k == 3)


def test_loaded_state_dict_is_not_aliased(device, gen):
    # Loading must copy: the counters of an optimizer must not write into the state dict (or into
    # another optimizer loaded from the same dict), as torch.optim.Optimizer.load_state_dict deep-copies.
    params = [randn((4,), F32, device, gen)]
    opt = FusedAccumSGD(params, lr=0.1)
    saved = opt.state_dict()
    twin_a, twin_b = [params[0].clone()], [params[0].clone()]
    a, b = FusedAccumSGD(twin_a, lr=0.1), FusedAccumSGD(twin_b, lr=0.1)
    a.load_state_dict(saved)
    b.load_state_dict(saved)
    twin_a[0].grad = torch.full((4,), math.nan, device=device)
    a.step()
    assert int(a.skipped_steps) == 1
    assert int(saved["gradfuse"]["skipped_steps"]) == 0, "the loaded optimizer writes into the state dict"
    assert int(b.skipped_steps) == 0, "two optimizers loaded from one state dict share skipped_steps"


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_checkpoint_loads_into_torch_sgd(device, momentum):
    data = batches(21, 8, F64, device)
    cfg = dict(lr=0.1, momentum=momentum, weight_decay=0.01)
    fused_model, sgd_model = make_model(4, F64, device), make_model(4, F64, device)
    opt = FusedAccumSGD(fused_model.parameters(), accumulation_steps=2, **cfg)
    for x, y in data[:4]:
        nn.functional.mse_loss(fused_model(x), y).backward()
        opt.step()
        opt.zero_grad()
    sgd_model.load_state_dict(fused_model.state_dict())
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.5)
    sgd.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert sgd.param_groups[0]["lr"] == 0.1 and sgd.param_groups[0]["momentum"] == momentum
    got = fused_run_continue(fused_model, opt, data[4:])
    expected = torch_continue(sgd_model, sgd, data[4:], 2)
    for a, b in zip(got, expected):
        assert_close(a, b, F64, "FusedAccumSGD -> SGD continuation")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_torch_sgd_checkpoint_loads_into_fused(device, momentum):
    data = batches(23, 8, F64, device)
    cfg = dict(lr=0.1, momentum=momentum, weight_decay=0.01)
    sgd_model = make_model(4, F64, device)
    sgd = torch.optim.SGD(sgd_model.parameters(), **cfg)
    torch_continue(sgd_model, sgd, data[:4], 2)
    fused_model = make_model(4, F64, device)
    fused_model.load_state_dict(sgd_model.state_dict())
    opt = FusedAccumSGD(fused_model.parameters(), lr=0.7, accumulation_steps=2)
    opt.load_state_dict(copy.deepcopy(sgd.state_dict()))
    assert opt.param_groups[0]["lr"] == 0.1 and opt.micro_step == 0
    expected = torch_continue(sgd_model, sgd, data[4:], 2)
    got = fused_run_continue(fused_model, opt, data[4:])
    for a, b in zip(got, expected):
        assert_close(a, b, F64, "SGD -> FusedAccumSGD continuation")


def fused_run_continue(model, opt, data):
    for x, y in data:
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def torch_continue(model, sgd, data, k):
    for c in range(len(data) // k):
        mean_gradients_into_grad(model, sgd, data[c * k:(c + 1) * k])
        sgd.step()
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ hyperparameter validation
@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(lr=-0.1), ValueError, "learning rate"),
    (dict(lr=math.nan), ValueError, "learning rate"),
    (dict(lr=torch.tensor(-1.0)), ValueError, "learning rate"),
    (dict(momentum=-0.5), ValueError, "momentum"),
    (dict(momentum=math.nan), ValueError, "momentum"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
    (dict(weight_decay=math.nan), ValueError, "weight_decay"),
    (dict(nesterov=True), ValueError, "Nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "Nesterov"),
    (dict(accumulation_steps=0), ValueError, "accumulation_steps"),
    (dict(accumulation_steps=-2), ValueError, "accumulation_steps"),
    (dict(accumulation_steps=2.5), TypeError, "accumulation_steps"),
    (dict(accumulation_steps=True), TypeError, "accumulation_steps"),
    (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (dict(max_grad_norm=math.nan), ValueError, "max_grad_norm"),
    (dict(norm_type=1.0), ValueError, "norm_type"),
    (dict(norm_type=3), ValueError, "norm_type"),
    (dict(accum_dtype=torch.int32), ValueError, "accum_dtype"),
])
def test_hyperparameter_validation(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        FusedAccumSGD([torch.zeros(3)], **kwargs)


@pytest.mark.parametrize("key,value", [("accumulation_steps", 2), ("max_grad_norm", 1.0), ("norm_type", 2.0)])
def test_optimizer_wide_settings_rejected_per_group(key, value):
    with pytest.raises(ValueError, match=f"{key} is optimizer-wide"):
        FusedAccumSGD([dict(params=[torch.zeros(3)], **{key: value})], lr=0.1)


def test_bad_group_hyperparameter_rejected_in_add_param_group():
    opt = FusedAccumSGD([torch.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group(dict(params=[torch.zeros(2)], momentum=-1.0))


def test_norm_type_inf_string_accepted():
    assert FusedAccumSGD([torch.zeros(3)], norm_type="inf").norm_type == math.inf


@pytest.fixture
def small_tensors_apart(monkeypatch):
    """These tests describe the sums of small tensors, which stay apart from .grad (not in .grad, even
    when the suite runs with GRADFUSE_TEST_RESIDENT_MIN_ELEMENTS=0)."""
    monkeypatch.setattr(resident_store, "RESIDENT_MIN_ELEMENTS", 1 << 16)


def test_adopted_gradient_zeroed_in_place_is_reported_before_the_update(device, small_tensors_apart):
    """module.zero_grad(set_to_none=False) would zero the gradient FusedAccumSGD adopted as its
    accumulator: the last micro-step must say so and leave the parameters alone."""
    model = make_model(9, F32, device)
    opt = FusedAccumSGD(model.parameters(), lr=0.1, momentum=0.9, accumulation_steps=3)
    data = batches(9, 3, F32, device)
    for i, (x, y) in enumerate(data):
        nn.functional.mse_loss(model(x), y).backward()
        if i == 2:
            before = [p.detach().clone() for p in model.parameters()]
            with pytest.raises(RuntimeError, match="modified in place"):
                opt.step()
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        else:
            opt.step()
            model.zero_grad(set_to_none=False)  # zeroes the adopted tensors in place


@pytest.mark.parametrize("k", [1, 2, 3])
def test_one_gradient_tensor_shared_by_two_parameters(device, gen, k):
    """p2.grad = p1.grad: both parameters see the same gradient, but the tensor may become only
    one accumulator (otherwise every later addition would land in it twice)."""
    params = [nn.Parameter(randn((5, 3), F32, device, gen)) for _ in range(2)]
    model = ref.ReferenceAccumSGD([p.detach().clone() for p in params], [dict(params=[0, 1], lr=0.5, momentum=0.9)],
                                  accumulation_steps=k, max_grad_norm=1.0, storage=[F32, F32],
                                  acc_storage=[F32, F32])
    opt = FusedAccumSGD(params, lr=0.5, momentum=0.9, accumulation_steps=k, max_grad_norm=1.0)
    for _ in range(2 * k):
        shared = randn((5, 3), F32, device, gen)
        params[0].grad, params[1].grad = shared, shared
        model.step([shared, shared])
        opt.step()
        opt.zero_grad()
        for i, p in enumerate(params):
            assert_close(p, model.params[i], F32, msg=f"param {i}")


def test_zero_grad_sets_every_gradient_to_none(device, gen, small_tensors_apart):
    # Native loop over every group (including one added later); the gradient tensors themselves
    # are left as they are (one may be this cycle's accumulator).
    a, b, c = (nn.Parameter(randn((4,), F32, device, gen)) for _ in range(3))
    opt = FusedAccumSGD([a, b], lr=0.1, accumulation_steps=3)
    opt.add_param_group(dict(params=[c], lr=0.2))
    grads = [randn((4,), F32, device, gen) for _ in range(3)]
    kept = [g.clone() for g in grads]
    a.grad, c.grad = grads[0], grads[2]
    opt.zero_grad()
    assert a.grad is None and b.grad is None and c.grad is None
    assert_bitwise(grads[0], kept[0], "zero_grad changed a gradient tensor")
    a.grad, b.grad, c.grad = grads
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in (a, b, c))


def test_single_process_keeps_the_accumulators_to_itself(device, gen, small_tensors_apart):
    # Alone, small tensors' sums stay apart: nothing is handed back as .grad (tests/test_distributed.py
    # covers the hand-back DDP needs, tests/test_resident_sums.py the sums kept in .grad).
    a = nn.Parameter(randn((4,), F32, device, gen))
    opt = FusedAccumSGD([a], lr=0.1, accumulation_steps=3)
    for _ in range(2):
        a.grad = randn((4,), F32, device, gen)
        opt.step()
        opt.zero_grad()
        assert a.grad is None
