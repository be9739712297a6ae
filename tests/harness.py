"""Drives FusedAccumSGD and the float64 reference through the same micro-batches and compares
them after every completed cycle (shared by test_optimizer and test_properties)."""
import math

import torch

import reference as ref
from data import randn
from gradfuse import FusedAccumSGD
from tolerances import after_cycles, assert_close, assert_scalar_close, loosest, tol_at_unit_scale

HYPER_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


def acc_dtype_of(dtype, accum_dtype=None):
    # Documented default: half-type gradients accumulate in float32.
    if accum_dtype is not None:
        return accum_dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def random_spec(gen, shapes, dtypes, k_choices=(1, 2, 3, 4), cycles=3):
    """A random configuration: groups with their own hyperparameters, K, clipping, norm type,
    missing gradients and (sometimes) a non-finite gradient."""
    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=gen))]

    n = len(shapes)
    order = torch.randperm(n, generator=gen).tolist()
    n_groups = min(n, pick([1, 2, 3]))
    groups = [dict(params=order[g::n_groups]) for g in range(n_groups)]
    for group in groups:
        momentum = pick([0.0, 0.5, 0.9])
        nesterov = momentum > 0 and pick([False, True])
        group.update(lr=pick([0.05, 0.1, 0.3]), momentum=momentum,
                     dampening=0.0 if nesterov or momentum == 0 else pick([0.0, 0.3]),
                     weight_decay=pick([0.0, 0.01, 0.1]), nesterov=nesterov, maximize=pick([False, True]))
    k = pick(list(k_choices))
    steps = k * cycles
    missing = set()
    for t in range(steps):
        for i in range(1, n):  # parameter 0 always has a gradient, so step() has something to do
            if pick([False, False, False, True]):
                missing.add((t, i))
    if n > 1:  # one parameter has no gradient during the whole second cycle
        silent = pick(list(range(1, n)))
        missing |= {(t, silent) for t in range(k, 2 * k)}
    bad = {}
    nonempty = [i for i in range(n) if torch.Size(shapes[i]).numel() > 0 and (k * 1, i) not in missing]
    if pick([False, True]) and nonempty:  # a NaN/inf in the first micro-step of cycle 2
        bad[k] = (pick(nonempty), pick([math.nan, math.inf, -math.inf]))
    return dict(shapes=shapes, dtypes=dtypes, groups=groups, k=k, cycles=cycles, missing=missing, bad=bad,
                clip=pick([None, "active", "inactive"]), norm_type=pick([2.0, math.inf]))


def run_against_reference(spec, device, gen):
    """Runs spec on both implementations; returns (optimizer, reference, params, initial)."""
    shapes, dtypes, k = spec["shapes"], spec["dtypes"], spec["k"]
    params = [randn(s, d, device, gen) for s, d in zip(shapes, dtypes)]
    initial = [p.clone() for p in params]
    max_grad_norm = {None: None, "active": 0.05, "inactive": 1e6}[spec["clip"]]
    opt = FusedAccumSGD([dict(params=[params[i] for i in g["params"]], **{h: g[h] for h in HYPER_KEYS if h in g})
                         for g in spec["groups"]], accumulation_steps=k, max_grad_norm=max_grad_norm,
                        norm_type=spec["norm_type"], accum_dtype=spec.get("accum_dtype"))
    accs = [acc_dtype_of(d, spec.get("accum_dtype")) for d in dtypes]
    model = ref.ReferenceAccumSGD(initial, spec["groups"], accumulation_steps=k, max_grad_norm=max_grad_norm,
                                  norm_type=spec["norm_type"], storage=list(dtypes), acc_storage=accs)
    norm_dtype = loosest([a for a, s in zip(accs, shapes) if torch.Size(s).numel()] or [torch.float64])
    for t in range(k * spec["cycles"]):
        assert opt.sync_gradients == model.sync_gradients and opt.micro_step == model.micro_step
        grads = []
        for i, p in enumerate(params):
            if (t, i) in spec["missing"]:
                p.grad = None
                grads.append(None)
                continue
            g = randn(shapes[i], dtypes[i], device, gen)
            if t in spec["bad"] and spec["bad"][t][0] == i:
                g.view(-1)[g.numel() // 2] = spec["bad"][t][1]
            grads.append(g.clone())  # the optimizer may adopt p.grad as its accumulator
            p.grad = g
        model.step(grads)
        opt.step()
        opt.zero_grad()
        if model.micro_step == 0:
            compare(opt, model, params, dtypes, norm_dtype, f"after cycle {(t + 1) // k}")
    rounded = after_cycles(len(model.norms))
    for i, (p, p0) in enumerate(zip(params, initial)):
        if not model.updated[i]:
            assert torch.equal(p, p0), f"param {i} had no gradient in any completed cycle but changed"
        elif p.numel() and (model.params[i] - ref.as64(p0)).abs().max() > 10 * tol_at_unit_scale(dtypes[i], rounded):
            assert not torch.equal(p, p0), f"param {i} should have moved but did not"
    return opt, model, params, initial


def compare(opt, model, params, dtypes, norm_dtype, where):
    rounded = after_cycles(len(model.norms))  # every completed cycle rounded params and buffers once
    for i, p in enumerate(params):
        assert p.dtype == dtypes[i]
        assert_close(p, model.params[i], dtypes[i], f"{where}: param {i} {tuple(p.shape)}", table=rounded)
        state = opt.state.get(p, {})
        if model.buffers[i] is None:
            assert "momentum_buffer" not in state or not bool(state.get("momentum_initialized", True)), \
                f"{where}: param {i} has a momentum buffer torch.optim.SGD would not have"
        else:
            assert_close(state["momentum_buffer"], model.buffers[i], dtypes[i], f"{where}: momentum of param {i}",
                         table=rounded)
    assert opt.last_grad_norm is not None and opt.last_grad_norm.dtype == torch.float64
    assert_scalar_close(opt.last_grad_norm, model.last_grad_norm, norm_dtype, f"{where}: last_grad_norm")
    assert int(opt.skipped_steps) == model.skipped_steps, f"{where}: skipped_steps"
    assert opt.skipped_steps.dtype == torch.int64 and opt.skipped_steps.dim() == 0
