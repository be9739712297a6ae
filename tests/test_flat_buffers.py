"""flat_buffers=True: parameters, gradients and state as views of one flat buffer per bucket;
autograd accumulates in place. Checked against the float64 reference and torch.optim, with real
autograd producing the gradients, and every misuse refused before anything changes."""
import copy
import math

import pytest
import torch
from torch import nn

import reference as ref
from data import generator, randn, seed_of
from gradfuse import FusedAccumAdamW, FusedAccumSGD
from problems import batches, make_model
from tolerances import after_cycles, assert_close, assert_scalar_close, loosest

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Edge sizes: empty, 0-dim, 1 element, odd lengths, a 4-D tensor in channels_last order.
SHAPES = [(0,), (), (1,), (7,), (3, 5), (2, 3, 5, 7), (33,), (4, 0, 2)]
GROUPS = [dict(params=[0, 2, 4, 6], lr=0.1, momentum=0.9, weight_decay=0.01),
          dict(params=[1, 3, 5, 7], lr=0.05, momentum=0.5, dampening=0.2, maximize=True)]


def _params(dtype, device, gen):
    params = [nn.Parameter(randn(s, dtype, device, gen)) for s in SHAPES]
    params[5] = nn.Parameter(params[5].detach().to(memory_format=torch.channels_last))
    return params


def _backward(params, grads):
    """Real autograd: d/dp sum(p * c) = c exactly, added by AccumulateGrad into p.grad in place."""
    loss = sum((p * g).sum() for p, g in zip(params, grads))
    loss.backward()


def _flat_sgd(params, **kw):
    return FusedAccumSGD([dict(g, params=[params[i] for i in g["params"]]) for g in GROUPS], flat_buffers=True,
                         **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_flat_sgd_matches_float64_reference(device, dtype, k, norm_type):
    gen = generator(seed_of(f"flat-{device}-{dtype}-{k}-{norm_type}"))
    params = _params(dtype, device, gen)
    initial = [p.detach().clone() for p in params]
    opt = _flat_sgd(params, accumulation_steps=k, max_grad_norm=0.05, norm_type=norm_type)
    model = ref.ReferenceAccumSGD(initial, GROUPS, accumulation_steps=k, max_grad_norm=0.05, norm_type=norm_type,
                                  storage=[dtype] * len(params), acc_storage=[dtype] * len(params))
    for t in range(3 * k):
        grads = [randn(p.shape, dtype, device, gen) for p in params]
        _backward(params, grads)
        model.step(grads)
        opt.step()
        opt.zero_grad()
        if model.micro_step == 0:
            where = f"after cycle {(t + 1) // k}"
            table = after_cycles(len(model.norms))
            for i, p in enumerate(params):
                assert_close(p, model.params[i], dtype, f"{where}: param {i}", table=table)
                assert_close(opt.state[p]["momentum_buffer"], model.buffers[i], dtype, f"{where}: momentum {i}",
                             table=table)
            assert_scalar_close(opt.last_grad_norm, model.last_grad_norm, loosest([dtype]), f"{where}: norm")
    assert params[5].is_contiguous(memory_format=torch.channels_last)  # the layout survived flattening


def test_flat_storage_is_one_buffer_per_bucket_and_grad_holds_the_running_sum():
    gen = generator(seed_of("flat-layout"))
    params = _params(torch.float32, "cpu", gen)
    values = [p.detach().clone() for p in params]
    opt = _flat_sgd(params, accumulation_steps=3)
    def span(t):
        return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()

    for bi, b in enumerate(opt._layout.buckets):
        (p_start, p_end), (g_start, g_end) = span(opt._store.params[bi]), span(opt._store.grads[bi])
        for p in opt._layout.sorted[b.start:b.stop]:
            if p.numel():
                assert p_start <= p.data_ptr() < p_end and p.data_ptr() % 64 == 0
                assert g_start <= p.grad.data_ptr() < g_end
                assert p.data_ptr() - p_start == p.grad.data_ptr() - g_start  # the same layout
    for p, v in zip(params, values):
        assert torch.equal(p, v)  # values carried into the buffer
    total = [torch.zeros_like(p) for p in params]
    for _ in range(2):
        grads = [randn(p.shape, torch.float32, "cpu", gen) for p in params]
        _backward(params, grads)
        opt.step()
        opt.zero_grad()  # mid-cycle: keeps the sum
        for t, g in zip(total, grads):
            t += g
    for p, t in zip(params, total):
        assert torch.equal(p.grad, t)


def _train_against_torch(fused_net, opt, torch_net, ref_opt, data, k, max_norm):
    """The fused optimizer on every micro-batch; torch on loss / k, clip_grad_norm_ and step every
    k micro-batches. Returns (gradfuse's, torch's) pre-clip norms per cycle."""
    norms = []
    for t, (x, y) in enumerate(data):
        nn.functional.mse_loss(fused_net(x), y).backward()
        opt.step()
        opt.zero_grad()
        (nn.functional.mse_loss(torch_net(x), y) / k).backward()
        if (t + 1) % k == 0:
            norm = nn.utils.clip_grad_norm_(torch_net.parameters(), max_norm)
            ref_opt.step()
            ref_opt.zero_grad()
            norms.append((float(opt.last_grad_norm), float(norm)))
    return norms


def test_flat_sgd_matches_torch_sgd_and_clip_grad_norm_on_an_mlp():
    k, steps = 3, 12
    fused_net, torch_net = make_model(1, torch.float64, "cpu"), make_model(1, torch.float64, "cpu")
    opt = FusedAccumSGD(fused_net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True,
                        accumulation_steps=k, max_grad_norm=0.3, flat_buffers=True)
    ref_opt = torch.optim.SGD(torch_net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    norms = _train_against_torch(fused_net, opt, torch_net, ref_opt, batches(2, steps, torch.float64, "cpu"), k, 0.3)
    assert len(norms) == steps // k and all(abs(a - b) <= 1e-12 * b for a, b in norms)
    for a, b in zip(fused_net.parameters(), torch_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_flat_adamw_matches_torch_adamw_and_clip_grad_norm_on_an_mlp(amsgrad):
    k, steps = 2, 10
    fused_net, torch_net = make_model(3, torch.float64, "cpu"), make_model(3, torch.float64, "cpu")
    opt = FusedAccumAdamW(fused_net.parameters(), lr=0.01, weight_decay=0.1, amsgrad=amsgrad, accumulation_steps=k,
                          max_grad_norm=0.2, flat_buffers=True)
    ref_opt = torch.optim.AdamW(torch_net.parameters(), lr=0.01, weight_decay=0.1, amsgrad=amsgrad)
    _train_against_torch(fused_net, opt, torch_net, ref_opt, batches(4, steps, torch.float64, "cpu"), k, 0.2)
    for a, b in zip(fused_net.parameters(), torch_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    saved = opt.state_dict()
    steps_saved = [s["step"] for s in saved["state"].values()]
    assert len({id(s) for s in steps_saved}) == len(steps_saved)  # one tensor per parameter, as torch's
    clone = make_model(3, torch.float64, "cpu")
    torch_opt = torch.optim.AdamW(clone.parameters(), lr=0.01, weight_decay=0.1, amsgrad=amsgrad)
    torch_opt.load_state_dict(saved)
    assert all(float(s["step"]) == steps / k for s in torch_opt.state.values())


def _cycle(params, opt, gen, k):
    for _ in range(k):
        _backward(params, [randn(p.shape, p.dtype, "cpu", gen) for p in params])
        opt.step()
        opt.zero_grad()


def test_flat_mid_cycle_checkpoint_resumes_exactly_in_flat_and_default_modes():
    gen = generator(seed_of("flat-resume"))
    k = 3
    params = _params(torch.float32, "cpu", gen)
    opt = _flat_sgd(params, accumulation_steps=k, max_grad_norm=0.05)
    _cycle(params, opt, gen, k)
    _backward(params, [randn(p.shape, p.dtype, "cpu", gen) for p in params])
    opt.step()
    opt.zero_grad()
    saved = copy.deepcopy(opt.state_dict())
    snapshot = [p.detach().clone() for p in params]
    rest = [[randn(p.shape, p.dtype, "cpu", gen) for p in params] for _ in range(k - 1)]

    def finish(flat):
        copies = [nn.Parameter(s.clone()) for s in snapshot]
        groups = [dict(g, params=[copies[i] for i in g["params"]]) for g in GROUPS]
        other = FusedAccumSGD(groups, accumulation_steps=k, max_grad_norm=0.05, flat_buffers=flat)
        other.load_state_dict(saved)
        assert other.micro_step == 1
        for grads in rest:
            _backward(copies, grads)
            other.step()
            other.zero_grad()
        return copies, other

    for grads in rest:
        _backward(params, grads)
        opt.step()
        opt.zero_grad()
    for flat in (True, False):
        copies, other = finish(flat)
        assert float(other.last_grad_norm) == pytest.approx(float(opt.last_grad_norm), rel=1e-6)
        for a, b in zip(params, copies):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_flat_loads_a_torch_sgd_state_dict_and_add_param_group_keeps_state():
    gen = generator(seed_of("flat-load"))
    params = _params(torch.float32, "cpu", gen)
    torch_opt = torch.optim.SGD([dict(g, params=[params[i] for i in g["params"]]) for g in GROUPS])
    _backward(params, [randn(p.shape, p.dtype, "cpu", gen) for p in params])
    torch_opt.step()
    buffers = {i: torch_opt.state[p]["momentum_buffer"].clone() for i, p in enumerate(params)}
    opt = _flat_sgd(params)
    opt.load_state_dict(torch_opt.state_dict())
    opt.zero_grad()
    extra = nn.Parameter(randn((9,), torch.float32, "cpu", gen))
    opt.add_param_group(dict(params=[extra], lr=0.2, momentum=0.9))
    grads = [randn(p.shape, p.dtype, "cpu", gen) for p in params + [extra]]
    expected = []
    for i, p in enumerate(params):
        g = next(gr for gr in GROUPS if i in gr["params"])
        expected.append(ref.sgd_update(ref.as64(p), ref.as64(grads[i]), ref.as64(buffers[i]), lr=g["lr"],
                                       weight_decay=g.get("weight_decay", 0.0), momentum=g["momentum"],
                                       dampening=g.get("dampening", 0.0), nesterov=False,
                                       maximize=g.get("maximize", False))[0])
    _backward(params + [extra], grads)
    opt.step()
    for i, p in enumerate(params):
        assert_close(p, expected[i], torch.float32, f"param {i}")
    assert opt._store.params[-1].data_ptr() <= extra.data_ptr()  # the new group has its own flat buffer


def test_flat_refuses_a_state_dict_that_splits_a_buffer():
    gen = generator(seed_of("flat-split"))
    params = _params(torch.float32, "cpu", gen)
    torch_opt = torch.optim.SGD([dict(g, params=[params[i] for i in g["params"]]) for g in GROUPS])
    params[2].grad = randn(params[2].shape, torch.float32, "cpu", gen)  # only one parameter gets a buffer
    torch_opt.step()
    params[2].grad = None
    opt = _flat_sgd(params)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="no momentum_buffer where others of its flat buffer do"):
        opt.load_state_dict(torch_opt.state_dict())
    assert not opt.state or all("momentum_buffer" not in s for s in opt.state.values())
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# ---------------------------------------------------------------------- misuse is refused
def _ready(k=2):
    gen = generator(seed_of(f"flat-misuse-{k}"))
    params = _params(torch.float32, "cpu", gen)
    opt = _flat_sgd(params, accumulation_steps=k, max_grad_norm=1.0)
    return params, opt, gen


def _snapshot(params, opt):
    return ([p.detach().clone() for p in params], [g.clone() for g in opt._store.grads],
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def _assert_unchanged(params, opt, snap):
    values, grads, state = snap
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert all(torch.equal(g, s) for g, s in zip(opt._store.grads, grads))
    for p, s in opt.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())


@pytest.mark.parametrize("misuse, message", [
    ("none_then_backward", "not its view of the flat gradient buffer"),
    ("rebind_data", "no longer lives in the optimizer's flat parameter buffer"),
    ("replace_grad", "not its view of the flat gradient buffer"),
    ("zero_in_place", "changed more than once since the last step"),
    ("two_backwards", "two backward passes before one step"),
    ("freeze", "no longer requires grad"),
    ("no_gradient", "received no gradient in this accumulation cycle"),
])
def test_flat_misuse_raises_before_anything_changes(misuse, message):
    params, opt, gen = _ready()
    _cycle(params, opt, gen, 2)  # momentum state exists
    live = [p for i, p in enumerate(params) if not (misuse == "no_gradient" and i == 3)]
    _backward(live, [randn(p.shape, p.dtype, "cpu", gen) for p in live])
    opt.step()
    if misuse == "none_then_backward":  # module.zero_grad() without optimizer.zero_grad(): autograd makes a new .grad
        params[3].grad = None
    elif misuse == "zero_in_place":  # module.zero_grad(set_to_none=False) mid-cycle: the running sum is lost
        params[3].grad.zero_()
    elif misuse == "rebind_data":
        params[3].data = params[3].detach().clone()
    elif misuse == "replace_grad":
        params[3].grad = params[3].grad.clone()
    elif misuse == "freeze":
        params[3].requires_grad_(False)
    elif misuse == "two_backwards":  # retain_graph / a block run twice: two adds before one step()
        _backward(live, [randn(p.shape, p.dtype, "cpu", gen) for p in live])
    if misuse not in ("replace_grad", "freeze"):
        _backward(live, [randn(p.shape, p.dtype, "cpu", gen) for p in live])
    snap = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    _assert_unchanged(params, opt, snap)


@pytest.mark.parametrize("when", ["mid_cycle", "cycle_start"])
def test_flat_module_zero_grad_then_optimizer_zero_grad_keeps_the_sum(when):
    """module.zero_grad() drops the .grad views (the buffer keeps the sum); optimizer.zero_grad()
    binds them again, so the next backward adds into the buffer: as if neither had been called."""
    k = 3
    results = []
    for interfere in (False, True):
        params = _params(torch.float32, "cpu", generator(seed_of("flat-rebind-params")))
        opt = _flat_sgd(params, accumulation_steps=k, max_grad_norm=0.05)
        data = generator(seed_of(f"flat-rebind-data-{when}"))
        for t in range(2 * k):
            if interfere and (t % k == 1 if when == "mid_cycle" else t % k == 0):
                for p in params:
                    p.grad = None  # module.zero_grad()
                opt.zero_grad()
            _backward(params, [randn(p.shape, p.dtype, "cpu", data) for p in params])
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in params] + [opt.last_grad_norm])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_flat_step_after_a_cycle_without_zero_grad_raises():
    params, opt, gen = _ready(k=1)
    _backward(params, [randn(p.shape, p.dtype, "cpu", gen) for p in params])
    opt.step()
    _backward(params, [randn(p.shape, p.dtype, "cpu", gen) for p in params])
    snap = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match="call optimizer.zero_grad"):
        opt.step()
    _assert_unchanged(params, opt, snap)


def test_flat_construction_refuses_what_it_cannot_hold():
    frozen = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2), requires_grad=False)]
    with pytest.raises(ValueError, match="does not require grad"):
        FusedAccumSGD(frozen, flat_buffers=True)
    half = [nn.Parameter(torch.randn(3, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="accum_dtype=torch.float32 cannot be honoured"):
        FusedAccumSGD(half, flat_buffers=True, accum_dtype=torch.float32)
    with pytest.raises(ValueError, match="exclude each other"):
        FusedAccumSGD([nn.Parameter(torch.randn(3))], flat_buffers=True, accumulate_in_backward=True)
    opt = FusedAccumSGD([nn.Parameter(torch.randn(3))], flat_buffers=True)
    with pytest.raises(ValueError, match="does not require grad"):
        opt.add_param_group(dict(params=[nn.Parameter(torch.randn(2), requires_grad=False)]))
    assert len(opt.param_groups) == 1


def test_flat_refuses_grad_scaler():
    params, opt, gen = _ready(k=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    grads = [randn(p.shape, p.dtype, "cpu", gen) for p in params]
    scaler.scale(sum((p * g).sum() for p, g in zip(params, grads))).backward()
    snap = _snapshot(params, opt)
    with pytest.raises(RuntimeError, match="cannot be used with GradScaler"):
        scaler.step(opt)
    _assert_unchanged(params, opt, snap)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_flat_adamw_matches_float64_reference_on_edge_shapes(device, dtype, norm_type):
    from test_adamw_optimizer import HYPER, CycleReference
    gen = generator(seed_of(f"flat-adamw-{device}-{dtype}-{norm_type}"))
    params = _params(dtype, device, gen)
    k, max_norm = 3, 0.2
    reference = CycleReference(params, k, max_norm, norm_type, HYPER)
    opt = FusedAccumAdamW(params, accumulation_steps=k, max_grad_norm=max_norm, norm_type=norm_type,
                          flat_buffers=True, **HYPER)
    for _ in range(3 * k):
        grads = [randn(p.shape, dtype, device, gen) for p in params]
        _backward(params, grads)
        opt.step()
        opt.zero_grad()
        reference.step(grads)
    for i, (p, want) in enumerate(zip(params, reference.params)):
        assert_close(p, want, dtype, f"parameter {i}")
        assert float(opt.state[p]["step"]) == reference.state[i][2] == 3
        assert_close(opt.state[p]["exp_avg"], reference.state[i][0], dtype, f"exp_avg {i}")
        assert_close(opt.state[p]["exp_avg_sq"], reference.state[i][1], dtype, f"exp_avg_sq {i}")


def test_flat_add_param_group_mid_cycle_and_after_a_cycle_keeps_sums_and_rules():
    gen = generator(seed_of("flat-regroup"))
    params = _params(torch.float32, "cpu", gen)
    opt = _flat_sgd(params, accumulation_steps=2)
    first = [randn(p.shape, p.dtype, "cpu", gen) for p in params]
    _backward(params, first)
    opt.step()
    opt.zero_grad()
    extra = nn.Parameter(randn((5,), torch.float32, "cpu", gen))
    opt.add_param_group(dict(params=[extra], lr=0.1))  # mid-cycle: the running sums move to the new buffers
    for p, g in zip(params, first):
        assert torch.equal(p.grad, g)
    second = [randn(p.shape, p.dtype, "cpu", gen) for p in params + [extra]]
    _backward(params + [extra], second)
    opt.step()  # every parameter had a gradient in the cycle (the first micro-batch's count)
    later = nn.Parameter(randn((3,), torch.float32, "cpu", gen))
    opt.add_param_group(dict(params=[later], lr=0.1))  # after the cycle, before zero_grad(): still refused
    _backward(params + [extra, later], [randn(p.shape, p.dtype, "cpu", gen) for p in params + [extra, later]])
    with pytest.raises(RuntimeError, match="call optimizer.zero_grad"):
        opt.step()
