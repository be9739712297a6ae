"""Gradient explosions: NaN/inf micro-batches, NaN storms, finite 1e30 spikes, error_if_nonfinite,
NaN propagation without skipping (as torch.optim.SGD + clip_grad_norm_), torch.amp.GradScaler, and a
hypothesis fuzz of gradient layouts, NaN/spike positions and clip thresholds against the reference."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import harness
import reference as ref
from data import DEVICES, DTYPES, generator, inject, randn
from gradfuse import FusedAccumSGD
from robustness import BF16, F16, F32, F64, LiveRun
from tolerances import assert_bitwise, assert_close, loosest

K = 3


def frozen(run):
    """Params and momentum buffers, cloned (for bit-identity across skipped cycles)."""
    return ([p.clone() for p in run.params],
            [run.opt.state[p]["momentum_buffer"].clone() for p in run.params])


def assert_frozen(run, before, what):
    params, buffers = before
    for i, p in enumerate(run.params):
        assert_bitwise(p, params[i], f"{what}: param {i} changed")
        assert_bitwise(run.opt.state[p]["momentum_buffer"], buffers[i], f"{what}: momentum {i} changed")


def poison_at(run, micro_steps, value, param=None):
    """A poison for LiveRun.feed: `value` at a random element of one parameter's gradient in the
    given micro-steps of the coming feed (counted from 0)."""
    counter = iter(range(10 ** 6))

    def poison(grads):
        t = next(counter)
        if t in micro_steps:
            i = param if param is not None else int(torch.randint(0, len(grads), (1,), generator=run.gen))
            inject(grads[i], value, run.gen)
    return poison


@pytest.mark.parametrize("position", [0, 1, K - 1], ids=["first", "middle", "last"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_one_bad_micro_batch_skips_exactly_its_cycle(device, seed, value, position):
    run = LiveRun(device, seed, k=K)
    run.feed(K)  # momentum exists
    before = frozen(run)
    for param in (0, 1, 3):  # fp32 (adopted), bf16 (owned fp32 accumulator), fp32 in the later group
        run.feed(K, poison=poison_at(run, {position}, value, param))
        assert_frozen(run, before, f"skipped cycle (bad grad in param {param})")
        last = float(run.opt.last_grad_norm)
        assert math.isnan(last) if math.isnan(value) else last == math.inf
        assert run.opt.micro_step == 0 and run.opt.state_dict()["gradfuse"]["accumulators"] == {}
    assert int(run.opt.skipped_steps) == 3
    run.feed(2 * K)  # recovery: matches the reference (which skipped the same cycles)
    assert int(run.opt.skipped_steps) == 3 and math.isfinite(float(run.opt.last_grad_norm))
    assert all(not torch.equal(p, b) for p, b in zip(run.params, before[0]))


def test_nan_storm_then_recovery(device, seed):
    run = LiveRun(device, seed, k=K)
    run.feed(K)
    before = frozen(run)
    storm = 4
    for c in range(storm):  # a NaN (or inf) in every micro-batch, in a random parameter
        run.feed(K, poison=poison_at(run, set(range(K)), math.nan if c % 2 else math.inf))
        assert not math.isfinite(float(run.opt.last_grad_norm))
        assert int(run.opt.skipped_steps) == c + 1
        assert_frozen(run, before, f"storm cycle {c}")
    run.feed(3 * K)
    assert int(run.opt.skipped_steps) == storm
    assert all(torch.isfinite(p).all() for p in run.params)
    assert all(not torch.equal(p, b) for p, b in zip(run.params, before[0]))


@pytest.mark.parametrize("spike,k", [(1e30, 4), (3e38, 2)], ids=["1e30", "near-fp32-max"])
def test_finite_spike_is_clipped_not_skipped(device, seed, spike, k):
    # Squares summed in float64: a 1e30 (or 3e38) fp32 gradient is a finite norm, clipping tames it.
    max_norm, lr = 0.5, 0.1
    groups = [dict(params=[0, 1, 2], lr=lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                   maximize=False)]
    run = LiveRun(device, seed, k=k, max_grad_norm=max_norm, shapes=[(50,), (3, 4), (7,)], dtypes=[F32, F32, BF16],
                  groups=groups)
    before = [p.clone().double() for p in run.params]

    def poison(grads):
        if run.opt.micro_step == 1:
            grads[0][7] = spike
            grads[1][2, 1] = -spike
    run.feed(k, poison=poison)
    norm = float(run.opt.last_grad_norm)
    assert math.isfinite(norm) and norm > spike / k and int(run.opt.skipped_steps) == 0
    step = torch.cat([(p.double() - b).reshape(-1) for p, b in zip(run.params, before)])
    assert torch.isfinite(step).all()
    # The update is lr * max_norm in norm, along the spikes (fp32 rounding of the params aside).
    assert abs(float(step.norm()) - lr * max_norm) < 1e-4 * lr * max_norm, float(step.norm())
    assert abs(float(step[7]) + lr * max_norm / 2 ** 0.5) < 1e-5 and abs(float(step[50 + 9]) - lr * max_norm / 2 ** 0.5) < 1e-5
    assert torch.equal(run.params[2], run.initial[2]), "the bf16 param's tiny clipped step rounds away"
    run.feed(2 * k)  # and training continues, still matching the reference
    assert int(run.opt.skipped_steps) == 0


@pytest.mark.parametrize("skip_nonfinite", [True, False])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_error_if_nonfinite_raises_untouched_then_starts_clean(device, seed, value, skip_nonfinite):
    run = LiveRun(device, seed, k=K, error_if_nonfinite=True, skip_nonfinite=skip_nonfinite)
    run.feed(K)
    before = frozen(run)
    run.feed(K - 1, poison=poison_at(run, {0}, value, param=1))
    grads = run.set_grads()
    with pytest.raises(RuntimeError, match=r"total gradient norm of this cycle is (nan|inf).*error_if_nonfinite"):
        run.opt.step()
    run.opt.zero_grad()
    run.model.step(grads)  # the reference discards (skips) the same cycle
    assert_frozen(run, before, "error_if_nonfinite cycle")
    assert run.opt.micro_step == 0 and run.opt.state_dict()["gradfuse"]["accumulators"] == {}
    assert not math.isfinite(float(run.opt.last_grad_norm))
    run.feed(2 * K)  # the next cycles start clean: no NaN carried over
    assert all(torch.isfinite(p).all() for p in run.params)
    assert all(not torch.equal(p, b) for p, b in zip(run.params, before[0]))


def _sgd_clip_reference(params, grads_per_step, k, max_norm, cfg):
    """torch.optim.SGD + manual accumulation (sum / K) + clip_grad_norm_ (no skipping)."""
    sgd = torch.optim.SGD(params, **cfg)
    history = []
    for c in range(len(grads_per_step) // k):
        for p, *gs in zip(params, *grads_per_step[c * k:(c + 1) * k]):
            total = torch.zeros_like(p)
            for g in gs:
                total += g
            p.grad = total / k
        if max_norm is not None:
            nn.utils.clip_grad_norm_(params, max_norm)
        sgd.step()
        history.append([p.detach().clone() for p in params])
    return history


@pytest.mark.parametrize("max_norm", [None, 0.3], ids=["no-clip", "clip"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_no_skip_propagates_like_torch_sgd(device, seed, dtype, value, max_norm):
    gen = generator(seed)
    k, cfg = 2, dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    shapes = [(6,), (3, 4)]
    start = [randn(s, dtype, device, gen) for s in shapes]
    steps = [[randn(s, dtype, device, gen) for s in shapes] for _ in range(4 * k)]
    inject(steps[k + 1][1], value, gen)  # the second cycle's last micro-batch
    expected = _sgd_clip_reference([p.clone().requires_grad_() for p in start], steps, k, max_norm, cfg)
    params = [p.clone().requires_grad_() for p in start]
    opt = FusedAccumSGD(params, accumulation_steps=k, max_grad_norm=max_norm, skip_nonfinite=False, **cfg)
    for t, grads in enumerate(steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad()
        if (t + 1) % k == 0:
            for i, (p, e) in enumerate(zip(params, expected[t // k])):
                assert_close(p, e.double(), dtype, f"cycle {t // k}: param {i}")  # NaN/inf positions must match
    assert int(opt.skipped_steps) == 0
    assert not all(torch.isfinite(p).all() for p in params), "the non-finite value should have propagated"
    if max_norm is not None and math.isnan(value):
        assert all(torch.isnan(p).all() for p in params)  # clip_grad_norm_'s NaN coefficient hits everything


# ------------------------------------------------------------------ torch.amp.GradScaler
def _amp_model(device):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 3)).to(device)


def _amp_data(device, n):
    gen = generator(77)
    return [(randn((5, 6), F32, device, gen), randn((5, 3), F32, device, gen)) for _ in range(n)]


def _scaler(device):
    # A small growth_interval so the scale both grows and backs off within the test.
    return torch.amp.GradScaler(device.type, init_scale=2.0 ** 10, growth_interval=3)


def _poison_weight(model):
    model[0].weight.grad[2, 3] = math.inf


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_grad_scaler_matches_sgd_with_unscale_and_clip(device, skip_nonfinite):
    k, max_norm, cfg = 3, 0.5, dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    data = _amp_data(device, 5 * k)
    bad = {k + 1, 3 * k + 2}  # inf in a middle micro-batch of cycle 2 and the last of cycle 4

    model = _amp_model(device)
    opt = FusedAccumSGD(model.parameters(), accumulation_steps=k, max_grad_norm=max_norm,
                        skip_nonfinite=skip_nonfinite, **cfg)
    assert opt._step_supports_amp_scaling
    scaler = _scaler(device)
    got, got_scales = [], []
    for t, (x, y) in enumerate(data):
        boundary = opt.sync_gradients
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if t in bad:
            _poison_weight(model)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        got_scales.append(scaler.get_scale())
        if boundary:
            got.append([p.detach().clone() for p in model.parameters()])
    assert int(opt.skipped_steps) == len(bad)

    ref_model = _amp_model(device)
    params = list(ref_model.parameters())
    sgd = torch.optim.SGD(params, **cfg)
    ref_scaler = _scaler(device)
    expected, expected_scales, total, cycle_bad = [], [], None, False
    for t, (x, y) in enumerate(data):
        sgd.zero_grad()
        ref_scaler.scale(nn.functional.mse_loss(ref_model(x), y)).backward()
        if t in bad:
            _poison_weight(ref_model)
        ref_scaler.unscale_(sgd)
        cycle_bad |= not all(torch.isfinite(p.grad).all() for p in params)
        total = [p.grad.clone() for p in params] if total is None else [a + p.grad for a, p in zip(total, params)]
        ref_scaler.update()
        expected_scales.append(ref_scaler.get_scale())
        if (t + 1) % k == 0:
            if not cycle_bad:  # GradScaler skips optimizer.step() for an inf/nan cycle
                for p, a in zip(params, total):
                    p.grad = a / k
                nn.utils.clip_grad_norm_(params, max_norm)
                sgd.step()
            expected.append([p.detach().clone() for p in params])
            total, cycle_bad = None, False
    assert got_scales == expected_scales
    changes = [b / a for a, b in zip(expected_scales, expected_scales[1:]) if a != b]
    assert 0.5 in changes and 2.0 in changes, f"the scale should back off and grow: {expected_scales}"
    assert len(got) == len(expected) == 5
    for c, (a, b) in enumerate(zip(got, expected)):
        for i, (p, q) in enumerate(zip(a, b)):
            assert_close(p, q.double(), F32, f"cycle {c}: param {i}")
    assert torch.equal(got[1][0], got[0][0]) and not torch.equal(got[2][0], got[1][0])  # cycle 2 skipped


# ------------------------------------------------------------------ fuzzing (what test_properties lacks)
LAYOUTS = ["contiguous", "transposed", "offset-view", "missing"]


@st.composite
def explosion_specs(draw):
    """Random params, per-micro-step gradient layouts (transposed, a view into a bigger buffer,
    missing), NaN/inf/spike positions and a continuous clip threshold."""
    n = draw(st.integers(1, 4))
    shapes = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)) | st.tuples(st.integers(1, 9)),
                           min_size=n, max_size=n))
    dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=n, max_size=n))
    k, cycles = draw(st.integers(1, 4)), draw(st.integers(2, 3))
    steps = k * cycles
    layouts = {(t, i): draw(st.sampled_from(LAYOUTS[:3] if i == 0 else LAYOUTS))
               for t in range(steps) for i in range(n)}
    bad = {}
    for _ in range(draw(st.integers(0, 3))):
        t, i = draw(st.integers(0, steps - 1)), draw(st.integers(0, n - 1))
        if layouts[(t, i)] == "missing":
            continue
        values = [math.nan, math.inf, -math.inf] + ([1e30, -3e37] if dtypes[i] != F16 else [6e4])
        bad[(t, i)] = (draw(st.integers(0, torch.Size(shapes[i]).numel() - 1)), draw(st.sampled_from(values)))
    momentum = draw(st.sampled_from([0.0, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    group = dict(params=list(range(n)), lr=draw(st.sampled_from([0.01, 0.1])), momentum=momentum,
                 dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.2])),
                 weight_decay=draw(st.sampled_from([0.0, 0.05])), nesterov=nesterov, maximize=draw(st.booleans()))
    max_norm = draw(st.none() | st.floats(1e-3, 1e3))
    return dict(shapes=shapes, dtypes=dtypes, k=k, steps=steps, layouts=layouts, bad=bad, group=group,
                max_norm=max_norm, norm_type=draw(st.sampled_from([2.0, math.inf])),
                seed=draw(st.integers(0, 2 ** 31 - 1)))


def _laid_out(g, layout, gen):
    if layout == "transposed" and g.dim() == 2:
        return g.t().contiguous().t()
    if layout == "offset-view":  # memory owned by someone else (like a DDP bucket): copied, never adopted
        buffer = torch.empty(g.numel() + 3, dtype=g.dtype, device=g.device)
        view = buffer[3:].view(g.shape)
        view.copy_(g)
        return view
    return g


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=explosion_specs())
def test_fuzz_layouts_nan_positions_and_clip_thresholds(device, spec):
    device = torch.device(device)
    gen = generator(spec["seed"])
    shapes, dtypes, k = spec["shapes"], spec["dtypes"], spec["k"]
    params = [randn(s, d, device, gen) for s, d in zip(shapes, dtypes)]
    g = spec["group"]
    opt = FusedAccumSGD([dict(g, params=params)], accumulation_steps=k, max_grad_norm=spec["max_norm"],
                        norm_type=spec["norm_type"])
    accs = [harness.acc_dtype_of(d) for d in dtypes]
    model = ref.ReferenceAccumSGD(params, [g], accumulation_steps=k, max_grad_norm=spec["max_norm"],
                                  norm_type=spec["norm_type"], storage=list(dtypes), acc_storage=accs)
    for t in range(spec["steps"]):
        grads = []
        for i, p in enumerate(params):
            layout = spec["layouts"][(t, i)]
            if layout == "missing":
                p.grad = None
                grads.append(None)
                continue
            grad = randn(shapes[i], dtypes[i], device, gen)
            if (t, i) in spec["bad"]:
                index, value = spec["bad"][(t, i)]
                grad.view(-1)[index] = value
            grads.append(grad.clone())
            p.grad = _laid_out(grad, layout, gen)
        model.step(grads)
        opt.step()
        opt.zero_grad()
        if model.micro_step == 0:
            harness.compare(opt, model, params, dtypes, loosest(accs), f"after micro-step {t}")
    assert int(opt.skipped_steps) == sum(not math.isfinite(x) for x in model.norms)
