"""gradfuse::clipped_adamw_step_ against the float64 reference (reference_adamw.py) and against
torch.optim.AdamW, plus input validation, skipping, opcheck and determinism."""
import math

import pytest
import torch

import reference_adamw as ref
from data import EDGE_SHAPES, randn, requires_cuda
from gradfuse import direct_ops, ops
from tolerances import assert_bitwise

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
INF = math.inf
# (parameter dtype, gradient dtype): same dtype, or float32 gradients (accumulators) for half params.
STEP_PAIRS = [(F32, F32), (F64, F64), (F16, F16), (BF16, BF16), (F16, F32), (BF16, F32)]
SHAPES = [s for s in EDGE_SHAPES if s != (65537,)] + [(5, 7)]  # 16385 still crosses a CPU chunk
STATE_KEYS = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

# (mantissa digits, smallest frexp exponent of a normal number) per dtype, for ulp sizes.
_DIGITS = {F64: (53, -1021), F32: (24, -125), F16: (11, -13), BF16: (8, -125)}
# Roundings of float math one result may carry, in ulps of the magnitude of the terms it was
# formed from (reference_adamw's error model); fp16/bf16 may be one storage ulp off on top.
MATH_ULPS = 8


def pair_id(pair):
    return f"{str(pair[0])[6:]}-{str(pair[1])[6:]}"


def ulp(x, dtype):
    """Size of one ulp of dtype at |x| (x float64), subnormals included."""
    digits, min_exp = _DIGITS[dtype]
    _, exponent = torch.frexp(x.abs())
    return torch.ldexp(torch.ones_like(x), exponent.clamp(min=min_exp) - digits)


def assert_ulps(actual, expected, terms, dtype, msg):
    """actual (stored in dtype) vs the float64 reference: within MATH_ULPS ulps of the math type at
    the terms' magnitude, plus (fp16/bf16) one storage ulp: a float32 result rounded once."""
    actual64 = actual.detach().cpu().to(F64)
    assert actual.dtype == dtype and actual64.shape == expected.shape, f"{msg}: {actual.dtype}{tuple(actual.shape)}"
    math_dtype = F64 if dtype == F64 else F32
    allowed = MATH_ULPS * ulp(terms, math_dtype)
    if dtype in (F16, BF16):
        expected = expected.to(dtype).to(F64)
        allowed = allowed + ulp(expected, dtype)
    assert torch.equal(torch.isnan(actual64), torch.isnan(expected)), f"{msg}: NaN positions differ"
    finite = ~torch.isnan(expected)
    error = (actual64 - expected)[finite].abs()
    worst = (error / allowed[finite]).max().item() if error.numel() else 0.0
    assert worst <= 1.0, f"{msg} [{dtype}]: error {worst:.2f}x the allowed ulps"


def make_state(device, gen, pair, shapes=SHAPES, amsgrad=True, step_dtype=F32, steps=None):
    """Random params, grads and AdamW state (exp_avg_sq >= 0, max >= some and < other new values,
    a different step count per tensor)."""
    param_dtype, grad_dtype = pair
    params = [randn(s, param_dtype, device, gen) for s in shapes]
    grads = [randn(s, grad_dtype, device, gen) for s in shapes]
    exp_avgs = [randn(s, param_dtype, device, gen, scale=0.3) for s in shapes]
    exp_avg_sqs = [randn(s, param_dtype, device, gen, scale=0.5).square() for s in shapes]
    maxes = [(v.double() * (0.5 + torch.rand(v.shape, generator=gen, dtype=F64).to(device))).to(param_dtype)
             for v in exp_avg_sqs] if amsgrad else []
    counts = steps if steps is not None else [(3 * i) % 11 for i in range(len(shapes))]
    state_steps = [torch.tensor(float(c), dtype=step_dtype, device=device) for c in counts]
    return dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=maxes,
                state_steps=state_steps)


def snapshot(state):
    return {k: [t.clone() for t in v] for k, v in state.items()}


def run_op(state, total_norm, lr, call=ops.clipped_adamw_step_, **hyper):
    call(state["params"], state["grads"], state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"],
         state["state_steps"], total_norm, lr, **hyper)


def expected_of(before, norm, lr, hyper):
    return ref.clipped_adamw_step(before["params"], before["grads"], before["exp_avgs"], before["exp_avg_sqs"],
                                  before["max_exp_avg_sqs"], before["state_steps"], norm, lr=lr, **hyper)


def check_against_reference(state, before, norm, lr, hyper, msg=""):
    results, terms = expected_of(before, norm, lr, hyper)
    lists = dict(param=state["params"], exp_avg=state["exp_avgs"], exp_avg_sq=state["exp_avg_sqs"],
                 max_exp_avg_sq=state["max_exp_avg_sqs"])
    for i, (want, term) in enumerate(zip(results, terms)):
        dtype = state["params"][i].dtype
        for key in STATE_KEYS:
            if key == "max_exp_avg_sq" and not hyper["amsgrad"]:
                continue
            assert_ulps(lists[key][i], want[key], term[key], dtype, f"{msg}{key}[{i}] {tuple(want[key].shape)}")
        assert float(state["state_steps"][i]) == want["step"], f"{msg}state_steps[{i}]"


def hyperparameters(amsgrad=False, maximize=False, weight_decay=0.0, grad_scale=1.0, max_norm=None,
                    beta1=0.9, beta2=0.999, eps=1e-8):
    return dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                grad_scale=grad_scale, max_norm=max_norm, skip_nonfinite=True)


CONFIGS = {
    "plain": dict(),
    "wd": dict(weight_decay=0.1),
    "amsgrad-wd": dict(amsgrad=True, weight_decay=0.01),
    "maximize-amsgrad": dict(maximize=True, amsgrad=True),
    "betas": dict(beta1=0.6, beta2=0.95, eps=1e-3, weight_decay=0.05),  # lerp's second formula (weight >= 0.5)
}


# ------------------------------------------------------------------ against the float64 reference
@pytest.mark.parametrize("clip,lr_kind", [("none", "tensor"), ("active", "float"), ("inactive", "tensor")])
@pytest.mark.parametrize("config", list(CONFIGS), ids=str)
@pytest.mark.parametrize("pair", STEP_PAIRS, ids=pair_id)
def test_matches_reference(device, gen, pair, config, clip, lr_kind):
    hyper = hyperparameters(grad_scale=0.5, **CONFIGS[config])
    state = make_state(device, gen, pair, amsgrad=hyper["amsgrad"])
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in state["grads"])) * hyper["grad_scale"]
    hyper["max_norm"] = {"none": None, "active": 0.3 * norm, "inactive": 3.0 * norm}[clip]
    lr = 0.01 if lr_kind == "float" else torch.tensor(0.01, dtype=F64, device=device)
    before = snapshot(state)
    run_op(state, torch.tensor(norm, dtype=F64, device=device), lr, **hyper)
    check_against_reference(state, before, norm, 0.01, hyper)
    for i, (p, old) in enumerate(zip(state["params"], before["params"])):
        if p.numel() >= 33:
            assert not torch.equal(p, old), f"params[{i}] did not change"
    assert_bitwise_all(state["grads"], before["grads"], "grads must not be modified")


def assert_bitwise_all(a, b, msg):
    for i, (x, y) in enumerate(zip(a, b)):
        assert_bitwise(x, y, f"{msg} [{i}]")


@pytest.mark.parametrize("pair", STEP_PAIRS, ids=pair_id)
def test_consecutive_steps(device, gen, pair):
    # Five steps with fresh gradients from zero state (torch's initial state): the steps count
    # 1..5 and every step's bias corrections follow; each step is checked from the op's own state.
    hyper = hyperparameters(amsgrad=True, weight_decay=0.01, max_norm=1.0)
    state = make_state(device, gen, pair, steps=[0] * len(SHAPES))
    for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        state[key] = [torch.zeros_like(t) for t in state[key]]
    for step in range(1, 6):
        state["grads"] = [randn(g.shape, g.dtype, device, gen) for g in state["grads"]]
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in state["grads"]))
        before = snapshot(state)
        run_op(state, torch.tensor(norm, dtype=F64, device=device), 1e-2, **hyper)
        check_against_reference(state, before, norm, 1e-2, hyper, f"step {step}: ")
        assert all(float(s) == step for s in state["state_steps"])


def test_float64_trajectory_matches_reference(device, gen):
    # Ten float64 steps against the reference run on its own (no re-sync): errors do not compound.
    hyper = hyperparameters(amsgrad=True, weight_decay=0.1, max_norm=2.0)
    state = make_state(device, gen, (F64, F64), shapes=[(33,), (3, 11)], step_dtype=F64)
    expect = {k: [ref.as64(t) for t in v] for k, v in state.items()}
    for _ in range(10):
        grads = [randn(g.shape, F64, device, gen) for g in state["grads"]]
        state["grads"], expect["grads"] = grads, [ref.as64(g) for g in grads]
        norm = math.sqrt(sum(float(g.square().sum()) for g in expect["grads"]))
        run_op(state, torch.tensor(norm, dtype=F64, device=device), 0.05, **hyper)
        results, _ = expected_of(expect, norm, 0.05, hyper)
        expect["params"] = [r["param"] for r in results]
        expect["exp_avgs"] = [r["exp_avg"] for r in results]
        expect["exp_avg_sqs"] = [r["exp_avg_sq"] for r in results]
        expect["max_exp_avg_sqs"] = [r["max_exp_avg_sq"] for r in results]
        expect["state_steps"] = [torch.tensor(r["step"], dtype=F64) for r in results]
    for got, want in zip(state["params"], expect["params"]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-14)
    assert [float(s) for s in state["state_steps"]] == [float(s) for s in expect["state_steps"]]


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("pair", STEP_PAIRS, ids=pair_id)
def test_misaligned_and_transposed_views(device, gen, pair, offset):
    # Views whose data pointer is not 16-byte aligned (scalar paths) and transposed (dense but
    # not contiguous) tensors laid out alike in every list.
    param_dtype, grad_dtype = pair
    sizes = [1, 7, 33, 1025, 16390]

    def view(n, dtype):
        return randn((n + offset,), dtype, device, gen)[offset:]

    def transposed(dtype):
        return randn((9, 5), dtype, device, gen).t()

    state = dict(params=[view(n, param_dtype) for n in sizes] + [transposed(param_dtype)],
                 grads=[view(n, grad_dtype) for n in sizes] + [transposed(grad_dtype)],
                 exp_avgs=[view(n, param_dtype) for n in sizes] + [transposed(param_dtype)],
                 exp_avg_sqs=[view(n, param_dtype).square() for n in sizes] + [transposed(param_dtype).square()],
                 max_exp_avg_sqs=[view(n, param_dtype).square() for n in sizes] + [transposed(param_dtype).square()],
                 state_steps=[torch.tensor(2.0, device=device) for _ in range(len(sizes) + 1)])
    state["exp_avg_sqs"][-1] = state["exp_avg_sqs"][-1].t().contiguous().t()  # square() of a view is contiguous
    state["max_exp_avg_sqs"][-1] = state["max_exp_avg_sqs"][-1].t().contiguous().t()
    assert all(p.data_ptr() % 16 != 0 for p in state["params"][:-1])
    assert not state["params"][-1].is_contiguous() and not state["exp_avg_sqs"][-1].is_contiguous()
    hyper = hyperparameters(amsgrad=True, weight_decay=0.01, grad_scale=0.5, max_norm=1.0)
    before = snapshot(state)
    run_op(state, torch.tensor(3.0, dtype=F64, device=device), 0.01, **hyper)
    check_against_reference(state, before, 3.0, 0.01, hyper)


def test_float64_steps_and_lr_tensor_dtypes(device, gen):
    # torch keeps `step` in float64 under torch.set_default_dtype(torch.float64); any float lr tensor.
    hyper = hyperparameters(weight_decay=0.01)
    for step_dtype, lr in [(F64, torch.tensor(0.02, dtype=F32)), (F32, torch.tensor([0.02], dtype=BF16)),
                           (F64, torch.tensor(0.02, dtype=F16))]:
        state = make_state(device, gen, (F32, F32), shapes=[(7,), (33,)], amsgrad=False, step_dtype=step_dtype)
        before = snapshot(state)
        run_op(state, torch.tensor(1.0, dtype=F64, device=device), lr.to(device), **hyper)
        check_against_reference(state, before, 1.0, float(lr), hyper, f"{step_dtype} steps, {lr.dtype} lr: ")
        assert all(s.dtype == step_dtype for s in state["state_steps"])


def test_many_tensors_more_than_one_launch(device, gen):
    # 1200 tensors exceed a CUDA parameter table at the op's list depths (5 lists: 623, 6: 540).
    shapes = [(1 + i % 37,) for i in range(1200)] + [(40_000,)]
    state = make_state(device, gen, (F32, F32), shapes=shapes, steps=[i % 5 for i in range(len(shapes))])
    hyper = hyperparameters(amsgrad=True, weight_decay=0.01, max_norm=1.0)
    before = snapshot(state)
    run_op(state, torch.tensor(2.0, dtype=F64, device=device), 0.01, **hyper)
    check_against_reference(state, before, 2.0, 0.01, hyper)


def test_empty_lists_and_empty_tensors(device, gen):
    # No tensors: nothing to do. Empty tensors still count a step (torch.optim.AdamW does too).
    norm = torch.tensor(1.0, dtype=F64, device=device)
    ops.clipped_adamw_step_([], [], [], [], [], [], norm, 0.1)
    state = make_state(device, gen, (F32, F32), shapes=[(0,), (0, 3)], steps=[4, 0])
    run_op(state, norm, 0.1, **hyperparameters())
    assert [float(s) for s in state["state_steps"]] == [5.0, 1.0]


# ------------------------------------------------------------------ against torch.optim.AdamW
@pytest.mark.parametrize("config", ["plain", "wd", "amsgrad-wd", "maximize-amsgrad", "betas"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_matches_torch_adamw(device, gen, dtype, config):
    # Four steps of torch.optim.AdamW (single-tensor path: what a plain AdamW(...) runs on CPU)
    # on the same parameters, gradients and state; the gradients carry the clip factor gradfuse
    # applies on the device, rounded to the gradient dtype as clip_grad_norm_ does.
    hyper = hyperparameters(**CONFIGS[config])
    shapes = [(7,), (33,), (3, 11), (1025,)]
    state = make_state(device, gen, (dtype, dtype), shapes=shapes, amsgrad=hyper["amsgrad"], steps=[0] * 4)
    for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        state[key] = [torch.zeros_like(t) for t in state[key]]
    torch_params = [p.detach().clone().requires_grad_() for p in state["params"]]
    opt = torch.optim.AdamW(torch_params, lr=0.01, betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                            weight_decay=hyper["weight_decay"], amsgrad=hyper["amsgrad"],
                            maximize=hyper["maximize"], foreach=False)
    for step in range(4):
        grads = [randn(p.shape, dtype, device, gen) for p in state["params"]]
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        max_norm = 0.5 * norm if step % 2 else None  # clipping on every other step
        factor = ref.clip_factor(norm, max_norm)
        for p, g in zip(torch_params, grads):
            p.grad = g * torch.tensor(factor, dtype=dtype, device=device)
        opt.step()
        state["grads"] = grads
        before = snapshot(state)
        run_op(state, torch.tensor(norm, dtype=F64, device=device), 0.01, **dict(hyper, max_norm=max_norm))
        _, terms = expected_of(before, norm, 0.01, dict(hyper, max_norm=max_norm))
        for i, p in enumerate(torch_params):
            torch_state = opt.state[p]
            assert float(torch_state["step"]) == float(state["state_steps"][i]) == step + 1
            theirs = dict(param=p.detach(), exp_avg=torch_state["exp_avg"], exp_avg_sq=torch_state["exp_avg_sq"],
                          max_exp_avg_sq=torch_state.get("max_exp_avg_sq"))
            ours = dict(param=state["params"][i], exp_avg=state["exp_avgs"][i], exp_avg_sq=state["exp_avg_sqs"][i],
                        max_exp_avg_sq=state["max_exp_avg_sqs"][i] if hyper["amsgrad"] else None)
            for key in STATE_KEYS:
                if ours[key] is not None:
                    # torch's result is the reference here (both are dtype math on the same inputs).
                    assert_ulps(ours[key], ref.as64(theirs[key]), terms[i][key], dtype, f"step {step + 1} {key}[{i}]")
            # keep both runs on identical inputs for the next step (differences do not compound)
            for ours_t, theirs_t in zip((state["params"][i], state["exp_avgs"][i], state["exp_avg_sqs"][i]),
                                        (p.detach(), torch_state["exp_avg"], torch_state["exp_avg_sq"])):
                ours_t.copy_(theirs_t)
            if hyper["amsgrad"]:
                state["max_exp_avg_sqs"][i].copy_(torch_state["max_exp_avg_sq"])


# ------------------------------------------------------------------ skipping
@pytest.mark.parametrize("bad", [math.nan, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("pair", STEP_PAIRS, ids=pair_id)
def test_nonfinite_norm_skips_everything(device, gen, pair, bad):
    state = make_state(device, gen, pair)
    before = snapshot(state)
    run_op(state, torch.tensor(bad, dtype=F64, device=device), 0.1,
           **hyperparameters(amsgrad=True, weight_decay=0.1, max_norm=1.0))
    for key in state:
        assert_bitwise_all(state[key], before[key], f"a skipped step changed {key}")


def test_without_skip_a_nan_norm_reaches_the_params_like_torch(device, gen):
    # skip_nonfinite=False: clip factor NaN -> NaN gradients -> NaN params and moments, and the
    # step counts (torch.optim.AdamW after clip_grad_norm_ of a NaN gradient does the same).
    state = make_state(device, gen, (F32, F32), shapes=[(7,), (33,)], amsgrad=False, steps=[1, 1])
    run_op(state, torch.tensor(math.nan, dtype=F64, device=device), 0.1,
           **dict(hyperparameters(max_norm=1.0), skip_nonfinite=False))
    assert all(torch.isnan(t).all() for t in state["params"] + state["exp_avgs"] + state["exp_avg_sqs"])
    assert [float(s) for s in state["state_steps"]] == [2.0, 2.0]


def test_infinite_norm_without_clipping_or_skip_updates(device, gen):
    # Neither skipping nor clipping: the norm is not used at all.
    state = make_state(device, gen, (F32, F32), shapes=[(7,)], amsgrad=False, steps=[0])
    before = snapshot(state)
    hyper = dict(hyperparameters(), skip_nonfinite=False)
    run_op(state, torch.tensor(INF, dtype=F64, device=device), 0.1, **hyper)
    check_against_reference(state, before, INF, 0.1, hyper)


# ------------------------------------------------------------------ the direct (dispatcher-free) call
def test_direct_call_matches_torch_ops_bitwise(device, gen):
    state = make_state(device, gen, (BF16, F32))
    twin = snapshot(state)
    hyper = hyperparameters(amsgrad=True, weight_decay=0.01, grad_scale=0.25, max_norm=1.0)
    norm = torch.tensor(5.0, dtype=F64, device=device)
    lr = torch.tensor(0.01, device=device)
    run_op(state, norm, lr, **hyper)
    run_op(twin, norm, lr, call=direct_ops.clipped_adamw_step_, **hyper)
    for key in state:
        assert_bitwise_all(state[key], twin[key], f"direct vs torch.ops: {key}")


def test_direct_call_raises_the_same_errors():
    state = make_state("cpu", torch.Generator().manual_seed(1), (F32, F32), shapes=[(3,)])
    state["exp_avgs"] = []
    norm = torch.tensor(1.0, dtype=F64)
    for call in (ops.clipped_adamw_step_, direct_ops.clipped_adamw_step_):
        with pytest.raises(ValueError, match=r"exp_avgs has 0 tensors but params has 1"):
            run_op(state, norm, 0.1, call=call, **hyperparameters())


# ------------------------------------------------------------------ validation
def _bad_case(case, gen):
    """(state, lr, total_norm, hyperparameters) with one defect."""
    state = make_state("cpu", gen, (F32, F32), shapes=[(4, 3), (5,)], amsgrad=True, steps=[2, 2])
    hyper = hyperparameters(amsgrad=True)
    lr, norm = 0.1, torch.tensor(1.0, dtype=F64)
    if case == "grads length":
        state["grads"] = state["grads"][:1]
    elif case == "exp_avgs length":
        state["exp_avgs"] = state["exp_avgs"] + state["exp_avgs"][:1]
    elif case == "max length":
        state["max_exp_avg_sqs"] = []
    elif case == "steps length":
        state["state_steps"] = state["state_steps"][:1]
    elif case == "grad shape":
        state["grads"][1] = randn((6,), F32, "cpu", gen)
    elif case == "moment shape":
        state["exp_avg_sqs"][1] = randn((5, 1), F32, "cpu", gen)
    elif case == "moment layout":
        state["exp_avgs"][0] = randn((3, 4), F32, "cpu", gen).t()
    elif case == "moment dtype":
        state["exp_avgs"][1] = state["exp_avgs"][1].double()
    elif case == "max dtype":
        state["max_exp_avg_sqs"][0] = state["max_exp_avg_sqs"][0].half()
    elif case == "grad dtype":
        state["grads"] = [g.double() for g in state["grads"]]
    elif case == "half grads for float params":
        state["grads"] = [g.half() for g in state["grads"]]
    elif case == "mixed param dtypes":
        state["params"][1] = state["params"][1].double()
    elif case == "non-dense param":
        state["params"][0] = randn((4, 6), F32, "cpu", gen)[:, ::2]
    elif case == "sparse grad":
        state["grads"][1] = state["grads"][1].to_sparse()
    elif case == "step dtype":
        state["state_steps"] = [torch.tensor(2, dtype=torch.int64) for _ in range(2)]
    elif case == "mixed step dtypes":
        state["state_steps"][1] = state["state_steps"][1].double()
    elif case == "step size":
        state["state_steps"][1] = torch.zeros(2)
    elif case == "norm dtype":
        norm = torch.tensor(1.0)
    elif case == "lr size":
        lr = torch.ones(2)
    elif case == "lr integer":
        lr = torch.tensor(1)
    elif case == "beta1":
        hyper["beta1"] = 1.0
    elif case == "beta2":
        hyper["beta2"] = math.nan
    elif case == "eps":
        hyper["eps"] = -1e-8
    return state, lr, norm, hyper


BAD_CASES = [
    ("grads length", ValueError, r"grads has 1 tensors but params has 2"),
    ("exp_avgs length", ValueError, r"exp_avgs has 3 tensors"),
    ("max length", ValueError, r"max_exp_avg_sqs has 0 tensors"),
    ("steps length", ValueError, r"state_steps has 1 tensors"),
    ("grad shape", ValueError, r"grads\[1\] has shape \[6\] but params\[1\] has shape \[5\]"),
    ("moment shape", ValueError, r"exp_avg_sqs\[1\] has shape"),
    ("moment layout", ValueError, r"exp_avgs\[0\] has strides"),
    ("moment dtype", TypeError, r"exp_avgs\[1\] has dtype Double but Float is required"),
    ("max dtype", TypeError, r"max_exp_avg_sqs\[0\] has dtype Half"),
    ("grad dtype", TypeError, r"gradients of dtype Double cannot update parameters of dtype Float"),
    ("half grads for float params", TypeError, r"gradients of dtype Half cannot update"),
    ("mixed param dtypes", TypeError, r"params\[1\] has dtype Double"),
    ("non-dense param", ValueError, r"params\[0\] is not dense"),
    # torch.ops: the dispatcher finds no SparseCPU kernel; the direct call: the op's own check
    ("sparse grad", (ValueError, NotImplementedError), r"grads\[1\] has layout Sparse|SparseCPU"),
    ("step dtype", TypeError, r"state_steps\[0\] has dtype Long"),
    ("mixed step dtypes", TypeError, r"state_steps\[1\] has dtype Double"),
    ("step size", ValueError, r"state_steps must hold exactly one element"),
    ("norm dtype", TypeError, r"total_norm"),
    ("lr size", ValueError, r"lr_tensor must hold exactly one element"),
    ("lr integer", TypeError, r"lr_tensor must be a real floating-point"),
    ("beta1", ValueError, r"beta1 must be in \[0, 1\), got 1"),
    ("beta2", ValueError, r"beta2 must be in \[0, 1\), got nan"),
    ("eps", ValueError, r"eps must be >= 0"),
]


@pytest.mark.parametrize("case,error,pattern", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_rejects_bad_inputs_before_changing_anything(gen, case, error, pattern):
    state, lr, norm, hyper = _bad_case(case, gen)
    before = snapshot(state)
    for call in (ops.clipped_adamw_step_, direct_ops.clipped_adamw_step_):
        with pytest.raises(error, match=pattern):
            run_op(state, norm, lr, call=call, **hyper)
        for key in state:
            for i, (t, old) in enumerate(zip(state[key], before[key])):
                if t.layout == torch.strided and t.device.type == "cpu":
                    assert_bitwise(t, old, f"a rejected call changed {key}[{i}]")


@requires_cuda
def test_rejects_state_steps_on_another_device(gen):
    # torch.optim.AdamW keeps `step` on the CPU by default; the op needs it on the params' device.
    state = make_state("cuda", gen, (F32, F32), shapes=[(3,)], amsgrad=False)
    state["state_steps"] = [s.cpu() for s in state["state_steps"]]
    before = snapshot(state)
    with pytest.raises(ValueError, match=r"state_steps is on cpu but the tensors are on cuda"):
        run_op(state, torch.tensor(1.0, dtype=F64, device="cuda"), 0.1, **hyperparameters())
    for key in state:
        assert_bitwise_all(state[key], before[key], f"a rejected call changed {key}")


# ------------------------------------------------------------------ opcheck and determinism
@pytest.mark.parametrize("amsgrad,lr_tensor", [(False, None), (True, torch.tensor(0.1))], ids=["plain", "amsgrad"])
def test_opcheck(gen, amsgrad, lr_tensor):
    state = make_state("cpu", gen, (BF16, F32), shapes=[(3,), (2, 5)], amsgrad=amsgrad)
    args = (state["params"], state["grads"], state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"],
            state["state_steps"], torch.tensor(2.0, dtype=F64), lr_tensor, 0.01, 0.9, 0.999, 1e-8, 0.01, amsgrad,
            False, 0.5, 1.0, True)
    torch.library.opcheck(torch.ops.gradfuse.clipped_adamw_step_, args)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_bitwise_deterministic_and_thread_count_independent(gen, dtype):
    # Several 16384-element chunks per task, so two threads really split the work.
    shapes = [(100003,), (7,), (70001,), (3, 5)]
    state = make_state("cpu", gen, (dtype, dtype), shapes=shapes)
    hyper = hyperparameters(amsgrad=True, weight_decay=0.01, max_norm=1.0)
    results = []
    for threads in (2, 2, 1):
        torch.set_num_threads(threads)
        run = snapshot(state)
        run_op(run, torch.tensor(3.0, dtype=F64), 0.01, **hyper)
        results.append(run)
    for key in state:
        assert_bitwise_all(results[0][key], results[1][key], f"same inputs, different {key}")
        assert_bitwise_all(results[0][key], results[2][key], f"1 vs 2 threads: different {key}")


# Step counts per tensor: the usual small ones, and counts past 16 where 1 - beta2^step has lost
# enough leading digits that a 1-ulp pow difference grows to many ulps of the bias correction.
STEP_SETS = {"small": None, "past16": [0, 15, 16, 17, 40, 999, 4095, 12345, 2 ** 20, 3 * 10 ** 6]}


def pow_spread(beta, step):
    """Bound on the relative difference of 1 - beta^step between two pow implementations: glibc's
    (under 1 ulp) and CUDA's (2 ulps) differ by at most 3 ulps of beta^step, magnified by the
    cancellation in 1 - beta^step."""
    power = beta ** step
    return 3 * 2.0 ** -52 * power / (1.0 - power)


@requires_cuda
@pytest.mark.parametrize("steps", list(STEP_SETS), ids=str)
@pytest.mark.parametrize("pair", STEP_PAIRS, ids=pair_id)
def test_cuda_matches_cpu_bitwise(gen, pair, steps):
    # Same element math, no contraction on either side, bias corrections from the same doubles.
    # Only beta^step comes from two libraries (glibc's pow, CUDA's pow); rounded to float32 the
    # scalars agree, but float64 params may differ by what the pow spread makes of their update.
    counts = STEP_SETS[steps]
    state = make_state("cpu", gen, pair, steps=None if counts is None else counts[:len(SHAPES)])
    on_cuda = {k: [t.cuda() for t in v] for k, v in state.items()}
    before = snapshot(state)
    hyper = hyperparameters(amsgrad=True, weight_decay=0.01, grad_scale=0.5, max_norm=1.0)
    lr = torch.tensor(0.01)
    run_op(state, torch.tensor(3.0, dtype=F64), lr, **hyper)
    run_op(on_cuda, torch.tensor(3.0, dtype=F64, device="cuda"), lr.cuda(), **hyper)
    for key in state:
        if key == "params" and pair[0] == F64:
            for got, want, old, step in zip(on_cuda[key], state[key], before[key], state["state_steps"]):
                s = float(step)  # already incremented by the op
                spread = pow_spread(hyper["beta1"], s) + pow_spread(hyper["beta2"], s) / 2
                update = (want - old * (1 - 0.01 * hyper["weight_decay"])).abs()
                allowed = update * (spread + 8 * 2.0 ** -53) + ulp(want.abs(), F64)
                assert bool(((got.cpu() - want).abs() <= allowed).all()), f"CUDA vs CPU params at step {s}"
        else:
            assert_bitwise_all([t.cpu() for t in on_cuda[key]], state[key], f"CUDA vs CPU {key}")


@requires_cuda
def test_cuda_step_has_no_host_sync(gen):
    state = make_state("cuda", gen, (F32, F32))
    norm = torch.tensor(3.0, dtype=F64, device="cuda")
    lr = torch.tensor(0.01, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_op(state, norm, lr, call=direct_ops.clipped_adamw_step_, **hyperparameters(max_norm=1.0))
        run_op(state, norm, lr, **hyperparameters(amsgrad=True, max_norm=1.0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(float(s) == float(c) + 2 for s, c in zip(state["state_steps"], [(3 * i) % 11 for i in range(len(SHAPES))]))
