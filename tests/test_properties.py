"""Hypothesis: random parameter lists, hyperparameters, K, clipping and NaN positions; the
multi-cycle trajectory of FusedAccumSGD must follow the float64 reference."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harness
import reference as ref
from data import DEVICES, DTYPES, generator, randn
from gradfuse import ops
from tolerances import assert_close, assert_scalar_close, loosest

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shape_st = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)  # includes 0-dim and empty


@st.composite
def specs(draw):
    n = draw(st.integers(1, 5))
    shapes = draw(st.lists(shape_st, min_size=n, max_size=n))
    dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=n, max_size=n))
    k = draw(st.integers(1, 4))
    cycles = draw(st.integers(1, 3))
    n_groups = draw(st.integers(1, n))
    groups = []
    for g in range(n_groups):
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        groups.append(dict(params=list(range(g, n, n_groups)), lr=draw(st.sampled_from([0.01, 0.1, 0.5])),
                           momentum=momentum, dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.25])),
                           weight_decay=draw(st.sampled_from([0.0, 0.05])), nesterov=nesterov,
                           maximize=draw(st.booleans())))
    steps = k * cycles
    missing = {(t, i) for t in range(steps) for i in range(1, n) if draw(st.booleans())}
    bad = {}
    if draw(st.booleans()):
        t = draw(st.integers(0, steps - 1))
        candidates = [i for i in range(n) if torch.Size(shapes[i]).numel() and (t, i) not in missing]
        if candidates:
            bad[t] = (draw(st.sampled_from(candidates)), draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    return dict(shapes=shapes, dtypes=dtypes, groups=groups, k=k, cycles=cycles, missing=missing, bad=bad,
                clip=draw(st.sampled_from([None, "active", "inactive"])),
                norm_type=draw(st.sampled_from([2.0, math.inf]))), draw(st.integers(0, 2 ** 31 - 1))


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(case=specs())
def test_trajectory_matches_reference(device, case):
    spec, seed = case
    opt, model, params, _ = harness.run_against_reference(spec, torch.device(device), generator(seed))
    assert int(opt.skipped_steps) == model.skipped_steps == sum(not math.isfinite(x) for x in model.norms)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(shapes=st.lists(shape_st, min_size=1, max_size=6), dtype=st.sampled_from(DTYPES),
       norm_type=st.sampled_from([2.0, math.inf]), first=st.booleans(), scale=st.floats(-3, 3),
       seed=st.integers(0, 2 ** 31 - 1))
def test_accumulate_then_norm_matches_reference(device, shapes, dtype, norm_type, first, scale, seed):
    gen = generator(seed)
    acc_dtype = harness.acc_dtype_of(dtype)
    accs = [randn(s, acc_dtype, device, gen) for s in shapes]
    grads = [randn(s, dtype, device, gen) for s in shapes]
    old = [a.clone() for a in accs]
    state = ops.new_norm_state(device)
    ops.accumulate_(accs, grads, scale, first, state, norm_type)
    expected = ref.accumulate(old, grads, scale, first, acc_dtype)
    for a, e in zip(accs, expected):
        assert_close(a, e, acc_dtype)
    norm = ops.finalize_norm_(state, torch.zeros((), dtype=torch.int64, device=device), norm_type, 0.5)
    assert_scalar_close(norm, ref.total_norm(expected, norm_type) * 0.5, loosest([acc_dtype]), "norm")
    assert_scalar_close(ops.global_norm(accs, norm_type), ref.total_norm(expected, norm_type), acc_dtype, "global")
