"""Bad input is rejected with a clear error before anything changes. Every case runs against a
live optimizer in the MIDDLE of its second cycle (momentum buffers exist, two micro-steps are
accumulated, the next step is the cycle boundary): params, momentum buffers, the full
state_dict (accumulators, micro_step), skipped_steps and last_grad_norm must be bit-identical
after the error, and once the problem is fixed the run must go on exactly like the float64
reference that never saw the bad step. Adding a case is one line in CASES."""
import copy
import math

import pytest
import torch

from data import randn, requires_cuda
from gradfuse import FusedAccumSGD
from robustness import BF16, F32, F64, LiveRun, assert_same, snapshot
from tolerances import assert_bitwise

K = 3
OTHER = "cuda" if torch.cuda.is_available() else None


# ------------------------------------------------------------------ building the bad situations
def bad_grad(index, make):
    """Valid gradients everywhere, then make(run, param) replaces parameter index's; step()."""
    def case(run):
        run.set_grads()
        make(run, run.params[index])
        run.opt.step()
    return case


def set_data(fn):
    # The .grad setter refuses a different shape/dtype/device; swapping .data does not.
    def make(run, p):
        p.grad.data = fn(p.grad.data)
    return make


def mutate_group(index, **changes):
    """A hyperparameter set to a bad value between steps, then step() with valid gradients."""
    def case(run):
        run.opt.param_groups[index].update(changes)
        run.set_grads()
        run.opt.step()
    return case


def construct(**kwargs):
    """A second optimizer over the same parameters with bad optimizer-wide settings."""
    return lambda run: FusedAccumSGD(run.params, lr=0.1, **kwargs)


def add_group(make_params, **extra):
    return lambda run: run.opt.add_param_group(dict(params=make_params(run), **extra))


def fresh(run, shape=(4,), dtype=F32, **kw):
    return randn(shape, dtype, run.device, run.gen).requires_grad_(**kw)


def overlapping_strided_params(run):
    base = randn((6, 4), F32, run.device, run.gen)
    return [base[:, ::2].requires_grad_(), base[::3, :].requires_grad_()]  # element [0, 0] is in both


def overlapping_params(run):
    base = randn((10,), F32, run.device, run.gen)
    return [base[:6].requires_grad_(), base[4:].requires_grad_()]


def complex_params(run):
    return [torch.randn(3, dtype=torch.complex64, device=run.device).requires_grad_()]


def trained(make_opt, run, layout, shapes=None):
    """State dict of another optimizer over clones of the live params, grouped by `layout`
    (lists of parameter indices), after one step so that it has state."""
    params = [(torch.randn(shapes[i], device=run.device) if shapes else run.params[i].detach().clone())
              .requires_grad_() for g in layout for i in g]
    groups, start = [], 0
    for g in layout:
        groups.append(dict(params=params[start:start + len(g)]))
        start += len(g)
    opt = make_opt(groups)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


def fused(groups):
    return FusedAccumSGD(groups, lr=0.1, momentum=0.9)  # K=1: one step completes a cycle


def load(make_state_dict):
    return lambda run: run.opt.load_state_dict(make_state_dict(run))


def corrupt(edit):
    """The live optimizer's own (mid-cycle) state dict, edited, loaded back."""
    def make(run):
        sd = copy.deepcopy(run.opt.state_dict())
        edit(sd)
        return sd
    return load(make)


def sparse(run, p):
    p.grad = randn(tuple(p.shape), p.dtype, run.device, run.gen).to_sparse()


def expanded(run, p):
    p.grad = randn((1,), p.dtype, run.device, run.gen).expand(p.shape)


def other_device(t):
    return t.to("cpu" if t.is_cuda else OTHER)


LATER = 3  # parameter 3 = param_groups[1]['params'][1]: groups before it must stay untouched
NAMED0 = r"parameter 0 \(param_groups\[0\]\['params'\]\[0\]\)"
NAMED3 = r"parameter 3 \(param_groups\[1\]\['params'\]\[1\]\)"

# name, builds the bad situation on a live run, exception type, regex its message must match, needs a 2nd device
CASES = [
    ("sparse_grad", bad_grad(0, sparse), RuntimeError, NAMED0 + r" has a Sparse\w* gradient.*dense gradients only", False),
    ("sparse_grad_later_group", bad_grad(LATER, sparse), RuntimeError, NAMED3 + r" has a Sparse", False),
    ("expanded_grad", bad_grad(1, expanded), RuntimeError, r"parameter 1 .*not dense in memory \(strides \[0\]\)", False),
    ("expanded_grad_later_group", bad_grad(LATER, expanded), RuntimeError, NAMED3 + r" .*not dense in memory", False),
    ("grad_shape", bad_grad(0, set_data(lambda g: g.reshape(-1)[:7].clone())), RuntimeError, NAMED0 + r" has a gradient of shape \[7\] but the parameter has shape \[5, 4\]", False),
    ("grad_dtype", bad_grad(LATER, set_data(lambda g: g.double())), RuntimeError, NAMED3 + r" has a gradient of dtype Double but the parameter is Float", False),
    ("grad_device", bad_grad(0, set_data(other_device)), RuntimeError, NAMED0 + r" has its gradient on \w+.* but the parameter is on", True),
    ("complex_param_flat_buffers", lambda run: FusedAccumSGD(complex_params(run), lr=0.1, flat_buffers=True), ValueError, r"parameter 0 is complex or not dense in memory; flat_buffers=True holds real, dense", False),
    ("integer_param", add_group(lambda run: [torch.ones(3, dtype=torch.int64, device=run.device)]), ValueError, r"has dtype Long", False),
    ("overlapping_strided_params", add_group(overlapping_strided_params), ValueError, r"share memory", False),
    ("params_share_memory", add_group(overlapping_params), ValueError, r"share memory", False),
    ("new_param_views_live_one", add_group(lambda run: [run.params[0].detach().view(-1)[3:9].requires_grad_()]), ValueError, r"share memory", False),
    ("same_tensor_twice", add_group(lambda run: [fresh(run)] * 2), ValueError, r"same tensor more than once", False),
    ("same_tensor_twice_constructor", lambda run: FusedAccumSGD([run.params[2], run.params[2]]), ValueError, r"same tensor more than once", False),
    ("same_tensor_two_groups", add_group(lambda run: [fresh(run), run.params[1]]), ValueError, r"more than one parameter group", False),
    ("same_tensor_two_groups_constructor", lambda run: FusedAccumSGD([dict(params=[run.params[0]]), dict(params=[run.params[0]])]), ValueError, r"more than one parameter group", False),
    ("lr_negative", mutate_group(1, lr=-0.1), ValueError, r"Invalid learning rate: -0\.1", False),
    ("lr_nan", mutate_group(0, lr=math.nan), ValueError, r"Invalid learning rate: nan", False),
    ("lr_inf", mutate_group(1, lr=math.inf), ValueError, r"Invalid learning rate: inf", False),
    ("lr_string", mutate_group(0, lr="0.1"), TypeError, r"lr must be a real number, got str", False),
    ("momentum_negative", mutate_group(1, momentum=-0.9), ValueError, r"Invalid momentum value: -0\.9", False),
    ("momentum_nan", mutate_group(0, momentum=math.nan), ValueError, r"Invalid momentum value: nan", False),
    ("momentum_inf", mutate_group(0, momentum=math.inf), ValueError, r"Invalid momentum value: inf", False),
    ("weight_decay_negative", mutate_group(1, weight_decay=-1e-4), ValueError, r"Invalid weight_decay value: -0\.0001", False),
    ("weight_decay_nan", mutate_group(0, weight_decay=math.nan), ValueError, r"Invalid weight_decay value: nan", False),
    ("weight_decay_inf", mutate_group(1, weight_decay=math.inf), ValueError, r"Invalid weight_decay value: inf", False),
    ("dampening_nan", mutate_group(0, dampening=math.nan), ValueError, r"Invalid dampening value: nan", False),
    ("nesterov_without_momentum", mutate_group(1, momentum=0.0), ValueError, r"Nesterov momentum requires a momentum", False),
    ("nesterov_with_dampening", mutate_group(1, dampening=0.1), ValueError, r"Nesterov momentum requires .*zero dampening", False),
    ("nesterov_not_bool", mutate_group(1, nesterov=1), TypeError, r"nesterov must be a bool", False),
    ("bad_group_added", add_group(lambda run: [fresh(run)], momentum=-1.0), ValueError, r"Invalid momentum value: -1\.0", False),
    ("momentum_nan_constructor", construct(momentum=math.nan), ValueError, r"Invalid momentum value: nan", False),
    ("accumulation_steps_0", construct(accumulation_steps=0), ValueError, r"accumulation_steps must be an integer >= 1, got 0", False),
    ("accumulation_steps_-1", construct(accumulation_steps=-1), ValueError, r"accumulation_steps must be an integer >= 1, got -1", False),
    ("accumulation_steps_2.5", construct(accumulation_steps=2.5), TypeError, r"accumulation_steps must be an integer >= 1, got float 2\.5", False),
    ("accumulation_steps_True", construct(accumulation_steps=True), TypeError, r"accumulation_steps .* got bool True", False),
    ("accumulation_steps_str", construct(accumulation_steps="4"), TypeError, r"accumulation_steps .* got str '4'", False),
    ("max_grad_norm_0", construct(max_grad_norm=0), ValueError, r"max_grad_norm must be None \(no clipping\) or > 0, got 0", False),
    ("max_grad_norm_-1", construct(max_grad_norm=-1.0), ValueError, r"max_grad_norm .* got -1\.0", False),
    ("max_grad_norm_nan", construct(max_grad_norm=math.nan), ValueError, r"max_grad_norm .* got nan", False),
    ("norm_type_1", construct(norm_type=1), ValueError, r"norm_type must be 2\.0 or inf .* got 1", False),
    ("norm_type_3", construct(norm_type=3.0), ValueError, r"norm_type must be 2\.0 or inf .* got 3\.0", False),
    ("norm_type_fro", construct(norm_type="fro"), TypeError, r"norm_type must be a real number, got str 'fro'", False),
    ("optimizer_wide_in_group", add_group(lambda run: [fresh(run)], max_grad_norm=1.0), ValueError, r"max_grad_norm is optimizer-wide", False),
    ("optimizer_wide_in_group_constructor", lambda run: FusedAccumSGD([dict(params=run.params, accumulation_steps=2)]), ValueError, r"accumulation_steps is optimizer-wide", False),
    ("optimizer_wide_set_in_live_group", mutate_group(0, skip_nonfinite=False), ValueError, r"skip_nonfinite is optimizer-wide", False),
    ("load_adam_state_dict", load(lambda run: trained(lambda g: torch.optim.Adam(g, lr=0.1), run, [[0, 1], [2, 3]])), ValueError, r"lacks .*not a torch.optim.SGD", False),
    ("load_adam_state_as_sgd_groups", load(lambda run: dict(trained(lambda g: torch.optim.Adam(g, lr=0.1), run, [[0, 1], [2, 3]]), param_groups=copy.deepcopy(run.opt.state_dict()["param_groups"]))), ValueError, r"keys \['exp_avg', 'exp_avg_sq', 'step'\].*another optimizer", False),
    ("load_fewer_groups", load(lambda run: trained(fused, run, [[0, 1, 2]])), ValueError, r"it has 1 parameter groups, this optimizer has 2", False),
    ("load_fewer_params", load(lambda run: trained(fused, run, [[0], [2, 3]])), ValueError, r"parameter group 0 has a different number of parameters", False),
    ("load_other_group_sizes", load(lambda run: trained(fused, run, [[0, 1, 2], [3]])), ValueError, r"parameter group 0 has a different number", False),
    ("load_mismatched_shapes", load(lambda run: trained(fused, run, [[0, 1], [2, 3]], shapes=[(4, 5), (7,), (3,), (6,)])), ValueError, r"momentum_buffer of parameter 0 has shape \(4, 5\) but its parameter has shape \(5, 4\)", False),
    ("load_not_a_dict", load(lambda run: [1, 2]), ValueError, r"not an optimizer state dict", False),
    ("load_missing_state", corrupt(lambda sd: sd.pop("state")), ValueError, r"not an optimizer state dict", False),
    ("load_missing_gradfuse_key", corrupt(lambda sd: sd["gradfuse"].pop("micro_step")), ValueError, r"'gradfuse' entry is truncated", False),
    ("load_missing_accumulators", corrupt(lambda sd: sd["gradfuse"].pop("accumulators")), ValueError, r"'gradfuse' entry is truncated", False),
    ("load_micro_step_K", corrupt(lambda sd: sd["gradfuse"].update(micro_step=K)), ValueError, r"micro_step 3 is outside this optimizer's cycle of 3", False),
    ("load_micro_step_negative", corrupt(lambda sd: sd["gradfuse"].update(micro_step=-1)), ValueError, r"micro_step -1 is outside", False),
    ("load_micro_step_float", corrupt(lambda sd: sd["gradfuse"].update(micro_step=1.0)), ValueError, r"micro_step 1\.0 is outside", False),
    ("load_accumulator_wrong_shape", corrupt(lambda sd: sd["gradfuse"]["accumulators"].update({0: torch.zeros(20)})), ValueError, r"accumulator of parameter 0 has shape \(20,\) but its parameter has shape \(5, 4\)", False),
    ("load_accumulator_integer", corrupt(lambda sd: sd["gradfuse"]["accumulators"].update({2: torch.zeros(3, dtype=torch.int32)})), ValueError, r"accumulator of parameter 2 has dtype torch.int32", False),
    ("load_accumulator_unknown_param", corrupt(lambda sd: sd["gradfuse"]["accumulators"].update({7: torch.zeros(3)})), ValueError, r"accumulator names parameter 7, but there are 4", False),
    ("load_accumulators_at_micro_step_0", corrupt(lambda sd: sd["gradfuse"].update(micro_step=0)), ValueError, r"accumulators do not match the saved micro_step", False),
    ("load_other_accumulation_steps_mid_cycle", corrupt(lambda sd: sd["gradfuse"].update(accumulation_steps=4)), ValueError, r"saved mid-cycle with accumulation_steps=4", False),
    ("load_skipped_steps_int", corrupt(lambda sd: sd["gradfuse"].update(skipped_steps=5)), ValueError, r"skipped_steps must be a 1-element integer tensor", False),
    ("load_skipped_steps_float_tensor", corrupt(lambda sd: sd["gradfuse"].update(skipped_steps=torch.tensor(1.0))), ValueError, r"skipped_steps must be", False),
    ("load_last_grad_norm_float", corrupt(lambda sd: sd["gradfuse"].update(last_grad_norm=1.5)), ValueError, r"last_grad_norm", False),
    ("load_momentum_buffer_not_tensor", corrupt(lambda sd: sd["state"][1].update(momentum_buffer=[1.0] * 7)), ValueError, r"momentum_buffer of parameter 1 is list, expected a tensor", False),
    ("load_state_for_unknown_param", corrupt(lambda sd: sd["state"].update({9: {}})), ValueError, r"state has an entry for parameter 9, but there are 4", False),
    ("load_bad_hyperparameter", corrupt(lambda sd: sd["param_groups"][1].update(lr=-1.0)), ValueError, r"parameter group 1: Invalid learning rate", False),
    ("load_format_version", corrupt(lambda sd: sd["gradfuse"].update(format_version=99)), ValueError, r"unknown gradfuse format_version 99", False),
]


@pytest.mark.parametrize("name,build,error,pattern,second_device", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_before_changing_anything(device, seed, name, build, error, pattern, second_device):
    if second_device and OTHER is None:
        pytest.skip("needs a second device (CUDA)")
    run = LiveRun(device, seed, k=K)
    run.feed(K + 2)  # one full cycle (momentum exists), then two micro-steps into the second
    assert run.opt.micro_step == 2 and run.opt.sync_gradients
    before = snapshot(run.opt, run.params)
    assert before["state_dict"]["gradfuse"]["accumulators"], "the cycle is meant to be open"
    with pytest.raises(error, match=pattern):
        build(run)
    run.fix()
    after = snapshot(run.opt, run.params)
    assert_same(after, before, f"{name}: optimizer state after the error")
    # The problem fixed, the run goes on: the boundary step then a full cycle, each vs the reference.
    run.feed(1 + K)
    assert run.cycles == 3
    assert all(not torch.equal(p, b) for p, b in zip(run.params, before["params"])), "nothing moved afterwards"


def _run_with_layouts(device, seed, grad_layout, param_layout=None):
    """One run (checked against the reference) whose 2-d gradients/params get the given layouts."""
    run = LiveRun(device, seed, k=2, shapes=[(5, 4), (6, 3), (7,)], dtypes=[F32, BF16, F64],
                  groups=[dict(params=[0, 1, 2], lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01,
                               nesterov=True, maximize=False)])
    if param_layout:
        for p in run.params:
            p.data = param_layout(p.data)
    for _ in range(6):
        grads = run.random_grads()
        run.model.step(grads)
        for p, g in zip(run.params, grads):
            p.grad = grad_layout(g.clone())
        run.opt.step()
        run.opt.zero_grad()
        if run.model.micro_step == 0:
            run.compare("layout run")
    return run


def transposed(t):
    # Same values, column-major strides: dense, but laid out unlike a contiguous tensor.
    return t.t().contiguous().t() if t.dim() == 2 else t


def _assert_runs_bitwise(a, b, what):
    for p, q in zip(a.params, b.params):
        assert_bitwise(p, q, f"{what}: params")
        assert_bitwise(a.opt.state[p]["momentum_buffer"], b.opt.state[q]["momentum_buffer"], f"{what}: momentum")
    assert_bitwise(a.opt.last_grad_norm, b.opt.last_grad_norm, f"{what}: norm")


def test_transposed_gradient_is_handled(device, seed):
    plain = _run_with_layouts(device, seed, lambda g: g)
    other = _run_with_layouts(device, seed, transposed)
    assert not transposed(torch.ones(2, 3)).is_contiguous()
    _assert_runs_bitwise(plain, other, "a transposed (dense) gradient vs a contiguous one")


def test_transposed_parameter_with_either_gradient_layout(device, seed):
    # A dense but transposed parameter is accepted; a contiguous gradient for it is re-laid-out.
    native = _run_with_layouts(device, seed, transposed, param_layout=transposed)
    contiguous = _run_with_layouts(device, seed, lambda g: g, param_layout=transposed)
    assert not native.params[0].is_contiguous() and not contiguous.params[0].is_contiguous()
    _assert_runs_bitwise(native, contiguous, "transposed param, contiguous vs transposed gradient")


@requires_cuda
def test_group_spanning_cpu_and_cuda_is_handled(seed):
    # Not an error: buckets are per (group, device, dtype) and the global norm spans devices.
    run = LiveRun(torch.device("cpu"), seed, k=2, devices=["cpu", "cuda", "cpu", "cuda"])
    run.feed(6)
    assert {p.device.type for p in run.opt.param_groups[0]["params"]} == {"cpu", "cuda"}
