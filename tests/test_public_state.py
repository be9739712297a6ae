"""torch.optim's public state is the truth: whoever reads or writes param_groups, state, the
optimizer's attributes, copies or pickles the optimizer, or drives it from
torch.distributed.checkpoint the torch way gets torch's behaviour (checked against
torch.optim.SGD / AdamW doing the same thing), or a clear error before anything changes."""
import copy
import io
import pickle
from collections import defaultdict

import pytest
import torch

from gradfuse import FusedAccumAdamW, FusedAccumSGD
from tolerances import assert_bitwise

F64 = torch.float64
SGD_HYPER = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
ADAMW_HYPER = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
RULES = {"sgd": (FusedAccumSGD, torch.optim.SGD, SGD_HYPER), "adamw": (FusedAccumAdamW, torch.optim.AdamW, ADAMW_HYPER)}


def make_params(seed, shapes=((5, 4), (7,), (3,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64).requires_grad_() for s in shapes]


def grads_for(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=F64) for p in params]


def fused_step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()
    opt.zero_grad()


def torch_step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()
    opt.zero_grad()


def assert_same_params(a, b, msg):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-12, atol=1e-14, msg=f"{msg}: param {i}")


@pytest.fixture(params=list(RULES))
def rule(request):
    return RULES[request.param]


# ------------------------------------------------------------------ state written the torch way
@pytest.mark.parametrize("reset", ["clear", "empty_entry", "new_dict"])
def test_state_reset_the_torch_way_restarts_the_state_like_torch(rule, reset):
    fused_cls, torch_cls, hyper = rule
    ours, theirs = make_params(0), make_params(0)
    opt, ref = fused_cls(ours, **hyper), torch_cls(theirs, **hyper)
    for t in range(6):
        if t == 3:
            for o in (opt, ref):
                if reset == "clear":
                    o.state.clear()
                elif reset == "empty_entry":
                    for p in o.param_groups[0]["params"]:
                        o.state[p] = {}
                else:
                    o.state = defaultdict(dict)
        grads = grads_for(ours, 100 + t)
        fused_step(opt, ours, grads)
        torch_step(ref, theirs, grads)
        assert_same_params(ours, theirs, f"step {t}")
    assert len(opt.state_dict()["state"]) == len(ours), "state_dict must list the state made after the reset"


def test_momentum_buffer_set_the_torch_way_is_used():
    ours, theirs = make_params(1), make_params(1)
    opt, ref = FusedAccumSGD(ours, **SGD_HYPER), torch.optim.SGD(theirs, **SGD_HYPER)
    fused_step(opt, ours, grads_for(ours, 5))
    torch_step(ref, theirs, grads_for(theirs, 5))
    for o, params in ((opt, ours), (ref, theirs)):
        o.state[params[1]]["momentum_buffer"] = torch.full((7,), 0.25, dtype=F64)
        o.state[params[2]] = {"momentum_buffer": torch.full((3,), -0.5, dtype=F64)}
    fused_step(opt, ours, grads_for(ours, 6))
    torch_step(ref, theirs, grads_for(theirs, 6))
    assert_same_params(ours, theirs, "after setting momentum buffers")


def test_state_of_the_wrong_shape_is_refused_before_anything_changes():
    params = make_params(2)
    opt = FusedAccumSGD(params, **SGD_HYPER)
    fused_step(opt, params, grads_for(params, 1))
    opt.state[params[0]]["momentum_buffer"] = torch.zeros(3, dtype=F64)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"momentum_buffer.*shape"):
        fused_step(opt, params, grads_for(params, 2))
    for p, b in zip(params, before):
        assert_bitwise(p.detach(), b, "parameters after the refused step")


# ------------------------------------------------------------------ param_groups edited the torch way
@pytest.mark.parametrize("edit", ["append", "remove", "replace", "new_group"])
def test_param_groups_edited_by_hand_train_like_torch(rule, edit):
    fused_cls, torch_cls, hyper = rule
    ours, theirs = make_params(3), make_params(3)
    extra_ours, extra_theirs = make_params(4, shapes=((6,),))[0], make_params(4, shapes=((6,),))[0]
    opt, ref = fused_cls(ours[:2], **hyper), torch_cls(theirs[:2], **hyper)
    for t in range(5):
        if t == 2:
            for o, params, extra in ((opt, ours, extra_ours), (ref, theirs, extra_theirs)):
                group = o.param_groups[0]
                if edit == "append":
                    group["params"].append(params[2])
                elif edit == "remove":
                    group["params"].pop(0)
                elif edit == "replace":
                    group["params"][1] = params[2]
                else:
                    o.param_groups.append(dict(o.defaults, params=[params[2]]))
        grads = grads_for(ours, 200 + t)
        fused_step(opt, ours, grads)
        torch_step(ref, theirs, grads)
        assert_same_params(ours, theirs, f"{edit}, step {t}")


def test_param_groups_edit_is_checked_like_add_param_group():
    params = make_params(5)
    opt = FusedAccumSGD(params[:2], **SGD_HYPER)
    opt.param_groups[0]["params"].append(params[0])  # the same tensor twice
    with pytest.raises(ValueError, match="same tensor more than once"):
        fused_step(opt, params[:2], grads_for(params[:2], 1))


# ------------------------------------------------------------------ optimizer attributes
def test_accumulation_steps_changes_between_cycles_and_is_refused_when_too_small():
    params = make_params(6)
    opt = FusedAccumSGD(params, lr=0.1, accumulation_steps=3)
    fused_step(opt, params, grads_for(params, 1))
    fused_step(opt, params, grads_for(params, 2))
    with pytest.raises(ValueError, match="already accumulated"):
        opt.accumulation_steps = 2
    assert opt.accumulation_steps == 3 and opt.micro_step == 2
    opt.accumulation_steps = 4  # room for two more micro-batches
    before = [p.detach().clone() for p in params]
    fused_step(opt, params, grads_for(params, 3))
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "micro-step 3 of 4 must not update"
    fused_step(opt, params, grads_for(params, 4))
    assert not torch.equal(params[0], before[0]) and opt.micro_step == 0
    opt.accumulation_steps = 1
    with pytest.raises(TypeError):
        opt.accumulation_steps = 1.5


def test_repr_shows_the_optimizer_wide_settings():
    opt = FusedAccumSGD(make_params(7), lr=0.1, accumulation_steps=4, max_grad_norm=1.0)
    text = repr(opt)
    assert "accumulation_steps: 4" in text and "max_grad_norm: 1.0" in text and "Parameter Group 0" in text


def test_flat_buffers_is_optimizer_wide():
    opt = FusedAccumSGD(make_params(8)[:1], lr=0.1)
    with pytest.raises(ValueError, match="flat_buffers is optimizer-wide"):
        opt.add_param_group({"params": make_params(9)[1:], "flat_buffers": True})


# ------------------------------------------------------------------ copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch_save"])
@pytest.mark.parametrize("flat", [False, True], ids=["default", "flat"])
def test_copy_mid_cycle_continues_exactly_like_the_original(rule, how, flat):
    fused_cls, _, hyper = rule
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    opt = fused_cls(model.parameters(), accumulation_steps=3, max_grad_norm=0.5, flat_buffers=flat, **hyper)
    data = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i), dtype=F64) for i in range(8)]

    def micro(m, o, x):
        m(x).square().mean().backward()
        o.step()
        o.zero_grad()

    for x in data[:4]:  # one cycle and one micro-batch of the next
        micro(model, opt, x)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        model2, opt2 = torch.load(buffer, weights_only=False)
    assert (opt2.accumulation_steps, opt2.max_grad_norm, opt2.micro_step) == (3, 0.5, 1)
    for x in data[4:]:
        micro(model, opt, x)
        micro(model2, opt2, x)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert_bitwise(p.detach(), q.detach(), f"{how}: copy diverged")


def test_copy_with_accumulate_in_backward_is_refused_clearly():
    opt = FusedAccumSGD(make_params(10), lr=0.1, accumulate_in_backward=True)
    with pytest.raises(RuntimeError, match="accumulate_in_backward=True cannot be copied"):
        copy.deepcopy(opt)


# ------------------------------------------------------------------ construction and loading like torch
def test_named_parameters_record_param_names_like_torch(rule):
    fused_cls, torch_cls, hyper = rule
    model = torch.nn.Linear(3, 2).double()
    opt, ref = fused_cls(model.named_parameters(), **hyper), torch_cls(model.named_parameters(), **hyper)
    assert opt.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"] == ["weight", "bias"]
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    with pytest.raises(ValueError, match="with/without names"):
        fused_cls([("w", model.weight), model.bias], **hyper)
    for o in (fused_cls([model.weight], **hyper), torch_cls([model.weight], **hyper)):
        with pytest.raises(TypeError, match="ordered collections"):
            o.add_param_group({"params": {model.bias}})


def test_state_dict_without_later_group_keys_loads_like_torch(rule):
    fused_cls, torch_cls, hyper = rule
    params = make_params(11)
    opt = fused_cls(params, **hyper)
    fused_step(opt, params, grads_for(params, 1))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group.pop("maximize")  # checkpoints from before torch 1.12
    fresh = fused_cls(params, **hyper)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["maximize"] is False
    fused_step(fresh, params, grads_for(params, 2))


def test_state_dict_hook_with_a_non_parameter_key_round_trips(rule):
    fused_cls, _, hyper = rule
    params = make_params(12)
    opt = fused_cls(params, **hyper)
    opt.register_state_dict_pre_hook(lambda o: o.state.__setitem__("global_step", 7))
    fused_step(opt, params, grads_for(params, 1))
    saved = opt.state_dict()
    assert saved["state"]["global_step"] == 7
    fresh = fused_cls(params, **hyper)
    fresh.load_state_dict(saved)
    assert fresh.state["global_step"] == 7
    fused_step(fresh, params, grads_for(params, 2))


def test_found_inf_from_grad_scaler_skips_the_cycle():
    params = make_params(13)
    opt = FusedAccumSGD(params, lr=0.1, accumulation_steps=2)
    before = [p.detach().clone() for p in params]
    for t in range(2):  # finite gradients, but the scaler found an inf in micro-batch 0
        opt.found_inf = torch.tensor(1.0 if t == 0 else 0.0)
        fused_step(opt, params, grads_for(params, t))
        del opt.found_inf
    for p, b in zip(params, before):
        assert_bitwise(p.detach(), b, "a cycle with found_inf must not update")
    assert int(opt.skipped_steps) == 1


def test_tensor_betas_as_torch_accepts_them():
    ours, theirs = make_params(14), make_params(14)
    hyper = dict(ADAMW_HYPER, betas=(torch.tensor(0.8, dtype=F64), torch.tensor(0.95, dtype=F64)))
    opt, ref = FusedAccumAdamW(ours, **hyper), torch.optim.AdamW(theirs, **hyper)
    for t in range(3):
        fused_step(opt, ours, grads_for(ours, t))
        torch_step(ref, theirs, grads_for(theirs, t))
    assert_same_params(ours, theirs, "tensor betas")
    with pytest.raises(ValueError, match="both floats or both Tensors"):
        FusedAccumAdamW(make_params(15), betas=(0.9, torch.tensor(0.999)))


def test_errors_name_the_optimizer_that_raised():
    with pytest.raises(ValueError) as error:
        FusedAccumAdamW([torch.zeros(3, dtype=torch.complex64, requires_grad=True)], flat_buffers=True)
    assert "FusedAccumAdamW" in str(error.value) and "FusedAccumSGD" not in str(error.value)
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError) as error:
        FusedAccumAdamW([p]).step()
    assert "FusedAccumAdamW" in str(error.value) and "FusedAccumSGD" not in str(error.value)


# ------------------------------------------------------------------ torch.distributed.checkpoint
def test_dcp_get_state_dict_before_training_is_no_micro_batch(rule):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    fused_cls, _, hyper = rule
    runs = []
    for call_dcp in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).double()
        opt = fused_cls(model.parameters(), accumulation_steps=2, **hyper)
        if call_dcp:
            _, optim_state = get_state_dict(model, opt)
            assert opt.micro_step == 0 and all(p.grad is None for p in model.parameters())
        for i in range(4):
            x = torch.randn(5, 4, generator=torch.Generator().manual_seed(i), dtype=F64)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert_bitwise(a, b, "DCP's initialising step counted as a micro-batch")


@pytest.mark.parametrize("flat", [False, True], ids=["default", "flat"])
@pytest.mark.parametrize("cut", [3, 4], ids=["between_cycles", "mid_cycle"])
def test_dcp_state_dict_round_trip_resumes_bit_identically(rule, cut, flat):
    # get_state_dict / set_state_dict key the state by fully qualified names and keep only 'state'
    # and 'param_groups': the open cycle must travel there.
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    fused_cls, _, hyper = rule

    def make_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()

    data = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i), dtype=F64) for i in range(9)]
    model, resumed = make_model(), make_model()
    opt = fused_cls(model.parameters(), accumulation_steps=3, max_grad_norm=0.5, flat_buffers=flat, **hyper)
    opt2 = fused_cls(resumed.parameters(), accumulation_steps=3, max_grad_norm=0.5, flat_buffers=flat, **hyper)

    def micro(m, o, x):
        m(x).square().mean().backward()
        o.step()
        o.zero_grad()

    for x in data[:cut]:
        micro(model, opt, x)
    model_sd, optim_sd = get_state_dict(model, opt)
    assert set(optim_sd) == {"state", "param_groups"} and all(isinstance(k, str) for k in optim_sd["state"])
    set_state_dict(resumed, opt2, model_state_dict=model_sd, optim_state_dict=optim_sd)
    assert opt2.micro_step == opt.micro_step == cut % 3
    for x in data[cut:]:
        micro(model, opt, x)
        micro(resumed, opt2, x)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert_bitwise(p.detach(), q.detach(), "resumed through DCP's state dicts")
    assert all("gradfuse_accumulator" not in s for s in opt2.state.values() if isinstance(s, dict))


# ------------------------------------------------------------------ accumulate_in_backward
def test_backward_hooks_go_with_the_optimizer_and_on_request():
    import gc
    model = torch.nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=F64)
    opt = FusedAccumSGD(model.parameters(), lr=0.1, accumulate_in_backward=True)
    model(x).sum().backward()
    assert model.weight.grad is None, "the hook takes the gradient"
    opt.step()
    opt.zero_grad()
    del opt
    gc.collect()
    model(x).sum().backward()
    assert model.weight.grad is not None, "a collected optimizer's hooks must be gone"
    model.zero_grad()
    opt = FusedAccumSGD(model.parameters(), lr=0.1, accumulate_in_backward=True)
    opt.remove_backward_hooks()
    model(x).sum().backward()
    assert model.weight.grad is not None
    before = model.weight.detach().clone()
    opt.step()  # reads .grad like the default mode
    assert not torch.equal(model.weight, before)


def test_zero_grad_cannot_discard_a_gradient_already_summed_in_backward():
    model = torch.nn.Linear(3, 2).double()
    opt = FusedAccumSGD(model.parameters(), lr=0.1, accumulation_steps=2, accumulate_in_backward=True)
    opt.zero_grad()  # before any backward: fine
    model(torch.randn(4, 3, dtype=F64)).sum().backward()
    with pytest.raises(RuntimeError, match="cannot discard"):
        opt.zero_grad()
    opt.step()
    opt.zero_grad()  # after step(): fine


def test_frozen_parameters_are_accepted_in_backward_mode_like_torch():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)).double()
    model[0].weight.requires_grad_(False)
    opt = FusedAccumSGD(model.parameters(), lr=0.1, accumulate_in_backward=True)
    frozen = model[0].weight.detach().clone()
    model(torch.randn(4, 3, dtype=F64)).sum().backward()
    opt.step()
    assert torch.equal(model[0].weight, frozen)


@pytest.mark.parametrize("mode", ["default", "accumulate_in_backward", "flat_buffers"])
@pytest.mark.parametrize("cast_at", [4, 5], ids=["between_cycles", "mid_cycle"])
def test_model_cast_after_construction_trains_like_torch(mode, cast_at):
    """model.double() after the optimizer was built: the layout, the running sums and the state follow
    the parameters (torch keeps using its float32 momentum buffers: equal to float32 rounding)."""
    def build():
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))

    ours, theirs = build(), build()
    opt = FusedAccumSGD(ours.parameters(), lr=0.1, momentum=0.9, accumulation_steps=2, max_grad_norm=0.5,
                        **({mode: True} if mode != "default" else {}))
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(3, 5, generator=g) for _ in range(12)]
    for t, x in enumerate(batches):
        if t == cast_at:
            ours.double()
            theirs.double()
        ours(x.to(ours[0].weight.dtype)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        (theirs(x.to(theirs[0].weight.dtype)).square().sum() / 2).backward()
        if t % 2 == 1:
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
            ref.step()
            ref.zero_grad()
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.float64 for p in ours.parameters())
    for i, (a, b) in enumerate(zip(ours.parameters(), theirs.parameters())):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg=f"parameter {i}")
