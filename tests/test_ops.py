"""Each torch.ops.gradfuse op against the float64 reference, plus input validation, opcheck
and determinism."""
import math

import pytest
import torch

import reference as ref
from data import DTYPES, EDGE_SHAPES, inject, many_shapes, randn, requires_cuda
from gradfuse import ops
from tolerances import assert_bitwise, assert_close, assert_scalar_close, loosest

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
INF = math.inf
# (accumulator dtype, gradient dtype): same dtype, or float32 accumulators for half gradients.
ACC_PAIRS = [(F32, F32), (F64, F64), (F16, F16), (BF16, BF16), (F32, F16), (F32, BF16)]
# (parameter dtype, gradient dtype) for the update: same dtype, or float32 grads for half params.
STEP_PAIRS = [(F32, F32), (F64, F64), (F16, F16), (BF16, BF16), (F16, F32), (BF16, F32)]


def pair_id(pair):
    return f"{str(pair[0])[6:]}-{str(pair[1])[6:]}"


def norm_state(device, value=0.0, flag=0.0):
    return torch.tensor([value, flag], dtype=F64, device=device)


# ------------------------------------------------------------------ accumulate_
@pytest.mark.parametrize("norm_type", [2.0, INF])
@pytest.mark.parametrize("with_norm", [False, True], ids=["nonorm", "norm"])
@pytest.mark.parametrize("first", [True, False], ids=["first", "add"])
@pytest.mark.parametrize("pair", ACC_PAIRS, ids=pair_id)
def test_accumulate_matches_reference(device, gen, pair, first, with_norm, norm_type):
    acc_dtype, grad_dtype = pair
    accs = [randn(s, acc_dtype, device, gen) for s in EDGE_SHAPES]
    grads = [randn(s, grad_dtype, device, gen) for s in EDGE_SHAPES]
    if first:  # old contents must be ignored, not multiplied by 0 (NaN * 0 would leak)
        for a in accs:
            a.fill_(math.nan)
    old_accs, old_grads = [a.clone() for a in accs], [g.clone() for g in grads]
    scale = 0.37
    initial = 0.5 if math.isinf(norm_type) else 0.25  # the op must add into (max with), not overwrite
    state = norm_state(device, initial) if with_norm else None
    ops.accumulate_(accs, grads, scale, first, state, norm_type)
    expected = ref.accumulate(old_accs, old_grads, scale, first, acc_dtype)
    for i, (a, e) in enumerate(zip(accs, expected)):
        assert a.dtype == acc_dtype
        assert_close(a, e, acc_dtype, f"accs[{i}] shape {tuple(a.shape)}")
    for g, old in zip(grads, old_grads):
        assert_bitwise(g, old, "grads must not be modified")
    if with_norm:
        want = ref.merge_norm_state([initial, 0.0], expected, norm_type)
        assert_scalar_close(state[0], want[0], acc_dtype, "norm_state[0]")
        assert float(state[1]) == 0.0
        assert float(state[0]) != initial  # the data actually contributed


@pytest.mark.parametrize("pair", ACC_PAIRS, ids=pair_id)
def test_accumulate_many_tensors(device, gen, pair):
    # Hundreds of small tensors in one call (per-tensor segment bookkeeping).
    shapes = many_shapes(gen, 300)
    accs = [randn(s, pair[0], device, gen) for s in shapes]
    grads = [randn(s, pair[1], device, gen) for s in shapes]
    old = [a.clone() for a in accs]
    state = norm_state(device)
    ops.accumulate_(accs, grads, -1.5, False, state, 2.0)
    expected = ref.accumulate(old, grads, -1.5, False, pair[0])
    for a, e in zip(accs, expected):
        assert_close(a, e, pair[0])
    assert_scalar_close(state[0], ref.norm_partial(expected, 2.0)[0], pair[0], "sum of squares")


@pytest.mark.parametrize("norm_type", [2.0, INF])
@pytest.mark.parametrize("bad", [math.nan, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("pair", ACC_PAIRS, ids=pair_id)
def test_accumulate_nonfinite_sets_flag(device, gen, pair, bad, norm_type):
    shapes = [(7,), (65537,), (33,)]
    accs = [randn(s, pair[0], device, gen) for s in shapes]
    grads = [randn(s, pair[1], device, gen) for s in shapes]
    inject(grads[1], bad, gen)
    state = norm_state(device)
    ops.accumulate_(accs, grads, 1.0, True, state, norm_type)
    assert float(state[1]) == 1.0, "non-finite flag not set"
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    norm = ops.finalize_norm_(state, skipped, norm_type, 0.5, True)
    if math.isnan(bad):
        assert math.isnan(float(norm))
    else:
        assert float(norm) == INF
    assert int(skipped) == 1
    assert torch.equal(state.cpu(), torch.zeros(2, dtype=F64))


# ------------------------------------------------------------------ accumulate_norm_ / global_norm
@pytest.mark.parametrize("norm_type", [2.0, INF])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_norm_matches_reference(device, gen, dtype, norm_type):
    tensors = [randn(s, dtype, device, gen, scale=3.0) for s in EDGE_SHAPES]
    old = [t.clone() for t in tensors]
    state = norm_state(device, 0.5)
    ops.accumulate_norm_(state, tensors, norm_type)
    want = ref.merge_norm_state([0.5, 0.0], tensors, norm_type)
    assert_scalar_close(state[0], want[0], dtype, "norm_state[0]")
    assert float(state[1]) == 0.0
    for t, o in zip(tensors, old):
        assert_bitwise(t, o, "input modified")
    ops.accumulate_norm_(state, tensors, norm_type)  # a second call adds (2-norm) or keeps the max (inf)
    want2 = ref.merge_norm_state(want, tensors, norm_type)
    assert_scalar_close(state[0], want2[0], dtype, "second accumulate_norm_")


@pytest.mark.parametrize("norm_type", [2.0, INF])
@pytest.mark.parametrize("bad", [math.nan, INF], ids=["nan", "inf"])
def test_accumulate_norm_nonfinite(device, gen, bad, norm_type):
    tensors = [randn(s, F32, device, gen) for s in [(5,), (20000,)]]
    inject(tensors[1], bad, gen)
    state = norm_state(device)
    ops.accumulate_norm_(state, tensors, norm_type)
    assert float(state[1]) == 1.0
    result = float(ops.global_norm(tensors, norm_type))
    assert math.isnan(result) if math.isnan(bad) else result == INF


@pytest.mark.parametrize("norm_type", [2.0, INF])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_global_norm_matches_reference(device, gen, dtype, norm_type):
    tensors = [randn(s, dtype, device, gen) for s in EDGE_SHAPES + many_shapes(gen, 40)]
    result = ops.global_norm(tensors, norm_type)
    assert result.dtype == F64 and result.dim() == 0 and result.device.type == device.type
    assert_scalar_close(result, ref.total_norm(tensors, norm_type), dtype, "global_norm")
    # Matches torch's own clip_grad_norm_ total (the documented analogue).
    torch_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double(), norm_type)
                                                       for t in tensors if t.numel()]), norm_type)
    assert_scalar_close(result, float(torch_norm), dtype, "vs torch.linalg.vector_norm")


def test_global_norm_of_empty_tensors_is_zero(device):
    assert float(ops.global_norm([torch.empty(0, device=device)], 2.0)) == 0.0


def test_global_norm_rejects_empty_list():
    with pytest.raises(ValueError, match="empty"):
        ops.global_norm([], 2.0)


# ------------------------------------------------------------------ finalize_norm_
@pytest.mark.parametrize("count", [True, False])
@pytest.mark.parametrize("norm_type", [2.0, INF])
@pytest.mark.parametrize("state_value", [(6.25, 0.0), (0.0, 0.0), (INF, 1.0), (math.nan, 1.0), (6.25, 1.0)],
                         ids=["finite", "zero", "inf", "nan", "flagged-finite"])
def test_finalize_norm(device, state_value, norm_type, count):
    state = norm_state(device, *state_value)
    skipped = torch.full((), 5, dtype=torch.int64, device=device)
    result = ops.finalize_norm_(state, skipped, norm_type, 0.25, count)
    expected = ref.finalize(state_value, norm_type, 0.25)
    assert result.dtype == F64 and result.dim() == 0 and result.device.type == device.type
    assert_scalar_close(result, expected, F64, "finalize_norm_")
    assert torch.equal(state.cpu(), torch.zeros(2, dtype=F64)), "norm_state not reset"
    assert int(skipped) == 5 + (1 if count and not math.isfinite(expected) else 0)


# ------------------------------------------------------------------ clipped_sgd_step_
STEP_CONFIGS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False),
    dict(momentum=0.8, dampening=0.0, weight_decay=0.05, nesterov=True, maximize=False),
    dict(momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=True),
]


STEP_SHAPES = [s for s in EDGE_SHAPES if s != (65537,)]  # 16385 still crosses a chunk boundary


def _step_inputs(device, gen, pair, momentum, shapes=STEP_SHAPES):
    param_dtype, grad_dtype = pair
    params = [randn(s, param_dtype, device, gen) for s in shapes]
    grads = [randn(s, grad_dtype, device, gen) for s in shapes]
    if momentum:
        buffers = [randn(s, param_dtype, device, gen) for s in shapes]
        flags = [torch.tensor(i % 2 == 0, device=device) for i in range(len(shapes))]
        for b, f in zip(buffers, flags):
            if not bool(f):
                b.fill_(math.nan)  # an uninitialized buffer must not be read
    else:
        buffers, flags = [], []
    return params, grads, buffers, flags


@pytest.mark.parametrize("clip,lr_kind", [("none", "tensor"), ("active", "float"), ("inactive", "tensor")])
@pytest.mark.parametrize("config", STEP_CONFIGS, ids=["plain", "momentum-damp-wd", "nesterov", "maximize"])
@pytest.mark.parametrize("pair", STEP_PAIRS, ids=pair_id)
def test_clipped_sgd_step_matches_reference(device, gen, pair, config, clip, lr_kind):
    params, grads, buffers, flags = _step_inputs(device, gen, pair, config["momentum"])
    old_params = [p.clone() for p in params]
    old_buffers = [b.clone() for b in buffers]
    old_flags = [bool(f) for f in flags]
    grad_scale = 0.5
    norm = ref.total_norm(grads, 2.0) * grad_scale
    max_norm = {"none": None, "active": 0.3 * norm, "inactive": 3.0 * norm}[clip]
    lr = 0.1 if lr_kind == "float" else torch.tensor(0.1, dtype=F64, device=device)
    ops.clipped_sgd_step_(params, grads, buffers, flags, torch.tensor(norm, dtype=F64, device=device), lr,
                          grad_scale=grad_scale, max_norm=max_norm, skip_nonfinite=True, **config)
    n = len(params)
    want_p, want_b, want_f = ref.clipped_sgd_step(
        old_params, grads, old_buffers or [None] * n, old_flags or [False] * n, norm, lr=0.1,
        grad_scale=grad_scale, max_norm=max_norm, skip_nonfinite=True, dtype=pair[0], **config)
    for i, (p, w, o) in enumerate(zip(params, want_p, old_params)):
        assert p.dtype == pair[0]
        assert_close(p, w, pair[0], f"params[{i}]")
        if p.numel() >= 33:  # (a lone bf16 element may legitimately round back to itself)
            assert not torch.equal(p, o), f"params[{i}] did not change"
    if config["momentum"]:
        for i, (b, w) in enumerate(zip(buffers, want_b)):
            assert_close(b, w, pair[0], f"momentum_buffers[{i}]")
        assert all(bool(f) for f in flags), "momentum_initialized not set"


@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_every_op_on_more_tensors_than_one_launch_holds(device, gen, norm_type):
    # 1800 tensors exceed one CUDA parameter table at every list depth (1623 / 1159 / 737), so
    # each op takes several launches; the 3M-element tensor makes the norm's chunks span several
    # units (csrc/cuda/launch_plan.h). The CPU runs the same lists through its own chunking.
    shapes = [(1 + i % 37,) for i in range(1800)] + [(3_000_001,)]
    accs = [randn(s, F32, device, gen) for s in shapes]
    grads = [randn(s, F32, device, gen) for s in shapes]
    old = [a.clone() for a in accs]
    state = norm_state(device)
    ops.accumulate_(accs, grads, 0.5, False, state, norm_type)
    expected = ref.accumulate(old, grads, 0.5, False, F32)
    for i, (a, e) in enumerate(zip(accs, expected)):
        assert_close(a, e, F32, f"accs[{i}]")
    total = ops.finalize_norm_(state, torch.zeros((), dtype=torch.int64, device=device), norm_type, 1.0, True)
    assert_scalar_close(total, ref.total_norm(expected, norm_type), F32, "norm fused into accumulate_")
    assert_scalar_close(ops.global_norm(grads, norm_type), ref.total_norm(grads, norm_type), F32, "global_norm")

    params = [randn(s, F32, device, gen) for s in shapes]
    buffers = [randn(s, F32, device, gen) for s in shapes]
    flags = [torch.tensor(i % 3 != 0, device=device) for i in range(len(shapes))]
    old_params, old_buffers, old_flags = [p.clone() for p in params], [b.clone() for b in buffers], \
        [bool(f) for f in flags]
    norm = float(total)
    ops.clipped_sgd_step_(params, accs, buffers, flags, total, 0.1, momentum=0.9, weight_decay=0.01,
                          max_norm=0.5 * norm)
    want_p, want_b, _ = ref.clipped_sgd_step(old_params, accs, old_buffers, old_flags, norm, lr=0.1, momentum=0.9,
                                             dampening=0.0, weight_decay=0.01, nesterov=False, maximize=False,
                                             grad_scale=1.0, max_norm=0.5 * norm, skip_nonfinite=True, dtype=F32)
    for i in (0, 736, 737, 1158, 1159, 1622, 1623, len(shapes) - 1):  # both sides of every table edge
        assert_close(params[i], want_p[i], F32, f"params[{i}]")
        assert_close(buffers[i], want_b[i], F32, f"momentum_buffers[{i}]")
    assert_close(torch.cat([p.flatten() for p in params]), torch.cat([w.flatten() for w in want_p]), F32, "params")
    assert all(bool(f) for f in flags), "momentum_initialized not set on every tensor"


@pytest.mark.parametrize("bad", [math.nan, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("pair", STEP_PAIRS, ids=pair_id)
def test_clipped_sgd_step_skips_nonfinite_norm(device, gen, pair, bad):
    params, grads, buffers, flags = _step_inputs(device, gen, pair, 0.9)
    old_params, old_buffers, old_flags = [p.clone() for p in params], [b.clone() for b in buffers], \
        [f.clone() for f in flags]
    ops.clipped_sgd_step_(params, grads, buffers, flags, torch.tensor(bad, dtype=F64, device=device), 0.1,
                          momentum=0.9, weight_decay=0.1, max_norm=1.0, skip_nonfinite=True)
    for a, b in zip(params + buffers + flags, old_params + old_buffers + old_flags):
        assert_bitwise(a, b, "a skipped step changed state")


def test_clipped_sgd_step_without_skip_applies_nan_like_torch(device, gen):
    # skip_nonfinite=False with a NaN norm: clip factor NaN -> params NaN, as clip_grad_norm_ + SGD.
    params, grads, _, _ = _step_inputs(device, gen, (F32, F32), 0.0, shapes=[(7,), (33,)])
    ops.clipped_sgd_step_(params, grads, [], [], torch.tensor(math.nan, dtype=F64, device=device), 0.1,
                          max_norm=1.0, skip_nonfinite=False)
    assert all(torch.isnan(p).all() for p in params)


# ------------------------------------------------------------------ validation
def _dense(shape, dtype=F32):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def test_accumulate_rejects_non_contiguous_grad():
    grad = torch.randn(4, 6)[:, ::2]
    with pytest.raises(ValueError, match=r"grads\[0\] is not dense"):
        ops.accumulate_([_dense((4, 3))], [grad])


def test_accumulate_rejects_non_contiguous_acc():
    acc = torch.randn(4, 6)[:, ::2]
    with pytest.raises(ValueError, match=r"accs\[0\] is not dense"):
        ops.accumulate_([acc], [_dense((4, 3))])


def test_accumulate_rejects_different_layouts():
    # A transposed grad is dense but its flat order differs from the accumulator's.
    with pytest.raises(ValueError, match="strides"):
        ops.accumulate_([_dense((3, 4))], [torch.randn(4, 3).t()])


def test_accumulate_rejects_length_mismatch():
    with pytest.raises(ValueError, match="pair up"):
        ops.accumulate_([_dense(3), _dense(3)], [_dense(3)])


def test_accumulate_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        ops.accumulate_([_dense((3,))], [_dense((4,))])


@pytest.mark.parametrize("accs,grads", [
    ([F16], [F32]),          # half accumulators cannot take float32 gradients
    ([F64], [F32]),          # nor float64 float32
    ([F32, F64], [F32, F64]),  # accumulators of one call share a dtype
    ([F32], [torch.int32]),  # integer gradients
], ids=["f16-acc-f32-grad", "f64-acc-f32-grad", "mixed-accs", "int-grad"])
def test_accumulate_rejects_dtypes(accs, grads):
    with pytest.raises(TypeError, match="dtype"):
        ops.accumulate_([_dense(3, d) if d.is_floating_point else torch.ones(3, dtype=d) for d in accs],
                        [_dense(3, d) if d.is_floating_point else torch.ones(3, dtype=d) for d in grads])


def test_accumulate_rejects_bad_norm_state():
    with pytest.raises(ValueError, match="norm_state"):
        ops.accumulate_([_dense(3)], [_dense(3)], norm_state=torch.zeros(2, dtype=F32))
    with pytest.raises(ValueError, match="norm_state"):
        ops.accumulate_([_dense(3)], [_dense(3)], norm_state=torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("norm_type", [1.0, 3.0, -INF, 0.0])
def test_ops_reject_norm_type(norm_type):
    with pytest.raises(ValueError, match="norm_type"):
        ops.accumulate_([_dense(3)], [_dense(3)], norm_state=ops.new_norm_state("cpu"), norm_type=norm_type)
    with pytest.raises(ValueError, match="norm_type"):
        ops.accumulate_norm_(ops.new_norm_state("cpu"), [_dense(3)], norm_type)
    with pytest.raises(ValueError, match="norm_type"):
        ops.global_norm([_dense(3)], norm_type)
    with pytest.raises(ValueError, match="norm_type"):
        ops.finalize_norm_(ops.new_norm_state("cpu"), torch.zeros((), dtype=torch.int64), norm_type)


def test_norm_ops_reject_non_contiguous():
    view = torch.randn(6, 6)[::2]
    with pytest.raises(ValueError, match="not dense"):
        ops.accumulate_norm_(ops.new_norm_state("cpu"), [view])
    with pytest.raises(ValueError, match="not dense"):
        ops.global_norm([view])


def test_finalize_rejects_bad_counter():
    with pytest.raises(TypeError, match="skipped_steps"):
        ops.finalize_norm_(ops.new_norm_state("cpu"), torch.zeros((), dtype=F32))


def _step(params, grads, buffers=None, flags=None, norm=None, momentum=0.9, lr=0.1):
    n = len(params)
    buffers = [torch.zeros_like(p) for p in params] if buffers is None else buffers
    flags = [torch.tensor(False) for _ in range(n)] if flags is None else flags
    norm = torch.tensor(1.0, dtype=F64) if norm is None else norm
    ops.clipped_sgd_step_(params, grads, buffers, flags, norm, lr, momentum=momentum)


@pytest.mark.parametrize("case,error,pattern", [
    ("non-contiguous param", ValueError, r"params\[0\] is not dense"),
    ("non-contiguous grad", ValueError, r"grads\[0\] is not dense"),
    ("length mismatch", ValueError, "pair up"),
    ("buffer count", ValueError, "momentum_buffers"),
    ("shape mismatch", ValueError, "shape"),
    ("buffer dtype", TypeError, "momentum_buffers"),
    ("grad dtype", TypeError, "dtype"),
    ("norm dtype", TypeError, "total_norm"),
    ("norm size", ValueError, "total_norm"),
    ("lr size", ValueError, "lr_tensor"),
    ("lr complex", TypeError, "lr_tensor must be a real floating-point"),
    ("lr integer", TypeError, "lr_tensor must be a real floating-point"),
])
def test_clipped_sgd_step_rejects(case, error, pattern):
    p, g = _dense((4, 3)), _dense((4, 3))
    args = dict(params=[p], grads=[g])
    if case == "non-contiguous param":
        args["params"] = [torch.randn(4, 6)[:, ::2]]
    elif case == "non-contiguous grad":
        args["grads"] = [torch.randn(4, 6)[:, ::2]]
    elif case == "length mismatch":
        args["grads"] = [g, g]
    elif case == "buffer count":
        args["buffers"] = []
    elif case == "shape mismatch":
        args["grads"] = [_dense((3, 4))]
    elif case == "buffer dtype":
        args["buffers"] = [torch.zeros(4, 3, dtype=F64)]
    elif case == "grad dtype":
        args["grads"] = [_dense((4, 3), F64)]
    elif case == "norm dtype":
        args["norm"] = torch.tensor(1.0)
    elif case == "norm size":
        args["norm"] = torch.ones(2, dtype=F64)
    elif case == "lr size":
        args["lr"] = torch.ones(2)
    elif case == "lr complex":
        args["lr"] = torch.tensor(0.5 + 0.25j)
    elif case == "lr integer":
        args["lr"] = torch.tensor(1)
    before = args["params"][0].clone()
    with pytest.raises(error, match=pattern):
        _step(**args)
    assert_bitwise(args["params"][0], before, "a rejected call changed the params")


# ------------------------------------------------------------------ opcheck
def _opcheck_cases(gen):
    # CPU inputs for every op; each opcheck run mutates them, which the schemas declare.
    accs = [randn(s, F32, "cpu", gen) for s in [(3,), (2, 5), (1,)]]
    grads = [randn(s, BF16, "cpu", gen) for s in [(3,), (2, 5), (1,)]]
    params = [randn(s, F32, "cpu", gen) for s in [(3,), (2, 5)]]
    pgrads = [randn(s, F32, "cpu", gen) for s in [(3,), (2, 5)]]
    buffers = [randn(s, F32, "cpu", gen) for s in [(3,), (2, 5)]]
    flags = [torch.tensor(True), torch.tensor(False)]
    norm = torch.tensor(2.0, dtype=F64)
    return {
        "accumulate_": (accs, grads, 0.5, False, ops.new_norm_state("cpu"), 2.0),
        "accumulate_-first-nonorm": (accs, grads, 0.5, True, None, INF),
        "accumulate_norm_": (ops.new_norm_state("cpu"), accs, INF),
        "finalize_norm_": (torch.tensor([4.0, 0.0], dtype=F64), torch.zeros((), dtype=torch.int64), 2.0, 0.5, True),
        "global_norm": (accs, 2.0),
        "clipped_sgd_step_": (params, pgrads, buffers, flags, norm, torch.tensor(0.1), 0.0, 0.01, 0.9, 0.1, False,
                              False, 0.5, 1.0, True),
        "clipped_sgd_step_-nomomentum": (params, pgrads, [], [], norm, None, 0.1, 0.0, 0.0, 0.0, False, True, 1.0,
                                         0.0, True),
    }


@pytest.mark.parametrize("name", ["accumulate_", "accumulate_-first-nonorm", "accumulate_norm_", "finalize_norm_",
                                  "global_norm", "clipped_sgd_step_", "clipped_sgd_step_-nomomentum"])
def test_opcheck(gen, name):
    args = _opcheck_cases(gen)[name]
    op = getattr(torch.ops.gradfuse, name.split("-")[0])
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------ determinism
def _run_all_ops(tensors, grads):
    accs = [t.clone() for t in tensors]
    state = ops.new_norm_state("cpu")
    ops.accumulate_(accs, grads, 0.3, False, state, 2.0)
    state_inf = ops.new_norm_state("cpu")
    ops.accumulate_norm_(state_inf, accs, INF)
    norm = ops.finalize_norm_(state, torch.zeros((), dtype=torch.int64), 2.0, 0.5)
    params = [t.clone() for t in tensors]
    buffers = [g.clone() for g in grads]
    flags = [torch.tensor(True) for _ in grads]
    ops.clipped_sgd_step_(params, accs, buffers, flags, norm, 0.1, weight_decay=0.01, momentum=0.9,
                          max_norm=0.5 * float(norm))
    return accs + params + buffers + [norm, state_inf, ops.global_norm(accs, 2.0)]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_bitwise_deterministic_and_thread_count_independent(gen, dtype):
    # Over 4 chunks of 16384 elements per task, so 2 threads really split the work.
    shapes = [(100003,), (7,), (70001,), (3, 5)]
    tensors = [randn(s, dtype, "cpu", gen) for s in shapes]
    grads = [randn(s, dtype, "cpu", gen) for s in shapes]
    torch.set_num_threads(2)
    first = _run_all_ops(tensors, grads)
    again = _run_all_ops(tensors, grads)
    torch.set_num_threads(1)
    single = _run_all_ops(tensors, grads)
    for a, b, c in zip(first, again, single):
        assert_bitwise(a, b, "same inputs, different result")
        assert_bitwise(a, c, "1 thread vs 2 threads differ")


def test_norm_tolerance_choice_is_consistent():
    # The global norm of mixed dtypes is judged by the loosest participating dtype.
    assert loosest([F64, F32]) == loosest([F32])


@requires_cuda
@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_cuda_matches_cpu(gen, norm_type):
    # The two backends share one formula: CUDA results match CPU within the dtype tolerance.
    tensors = [randn(s, F32, "cpu", gen) for s in EDGE_SHAPES]
    accs_cpu, accs_cuda = [t.clone() for t in tensors], [t.cuda() for t in tensors]
    state_cpu, state_cuda = ops.new_norm_state("cpu"), ops.new_norm_state("cuda")
    ops.accumulate_(accs_cpu, tensors, 0.5, False, state_cpu, norm_type)
    ops.accumulate_(accs_cuda, [t.cuda() for t in tensors], 0.5, False, state_cuda, norm_type)
    for a, b in zip(accs_cpu, accs_cuda):
        assert_close(b, a.double(), F32, "CUDA accumulate_ vs CPU")
    assert_scalar_close(state_cuda[0], float(state_cpu[0]), F32, "CUDA norm state vs CPU")


@requires_cuda
@pytest.mark.parametrize("scale,amp", [(0.1, 10.0), (0.3, 6.0), (1.0, 65536.0)])
def test_cuda_amp_unscale_rounds_like_cpu(gen, scale, amp):
    # scale x (1 / amp_scale) is formed in double and rounded once on both backends: same bits.
    grads = [randn(s, F32, "cpu", gen) for s in EDGE_SHAPES]
    accs_cpu = [randn(tuple(g.shape), F32, "cpu", gen) for g in grads]
    accs_cuda = [a.cuda() for a in accs_cpu]
    amp_cpu = torch.tensor(amp)
    ops.accumulate_(accs_cpu, grads, scale, False, None, 2.0, amp_cpu)
    ops.accumulate_(accs_cuda, [g.cuda() for g in grads], scale, False, None, 2.0, amp_cpu.cuda())
    for a, b in zip(accs_cpu, accs_cuda):
        assert_bitwise(b.cpu(), a, "CUDA unscaled accumulate_ vs CPU")


# ------------------------------------------------------------------ misaligned views
def misaligned(n, dtype, device, gen, offset):
    """A 1-d view starting `offset` elements into its storage: its data pointer is not 16-byte
    aligned (forces the scalar paths; the vector paths must not be taken by mistake)."""
    return randn((n + offset,), dtype, device, gen)[offset:]


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("pair", ACC_PAIRS, ids=pair_id)
def test_every_op_on_misaligned_views(device, gen, pair, offset):
    acc_dtype, grad_dtype = pair
    sizes = [1, 7, 33, 1025, 16390]  # odd lengths, one crossing a 16384-element chunk
    accs = [misaligned(n, acc_dtype, device, gen, offset) for n in sizes]
    grads = [misaligned(n, grad_dtype, device, gen, offset) for n in sizes]
    assert all(a.data_ptr() % 16 != 0 for a in accs)
    old = [a.clone() for a in accs]
    state = norm_state(device)
    ops.accumulate_(accs, grads, 0.5, False, state, 2.0)
    expected = ref.accumulate(old, grads, 0.5, False, acc_dtype)
    for i, (a, e) in enumerate(zip(accs, expected)):
        assert_close(a, e, acc_dtype, f"accs[{i}]")
    assert_scalar_close(state[0], ref.norm_partial(expected, 2.0)[0], acc_dtype, "sum of squares")
    assert_scalar_close(ops.global_norm(grads, INF), ref.total_norm(grads, INF), grad_dtype, "inf-norm")
    param_dtype = grad_dtype
    params = [misaligned(n, param_dtype, device, gen, offset) for n in sizes]
    bufs = [misaligned(n, param_dtype, device, gen, offset) for n in sizes]
    flags = [torch.ones((), dtype=torch.bool, device=device) for _ in sizes]
    old_params, old_bufs = [p.clone() for p in params], [b.clone() for b in bufs]
    total = torch.tensor(3.0, dtype=F64, device=device)
    ops.clipped_sgd_step_(params, grads, bufs, flags, total, 0.1, weight_decay=0.01, momentum=0.9,
                          nesterov=True, grad_scale=0.5, max_norm=1.0)
    want_p, want_b, _ = ref.clipped_sgd_step(old_params, grads, old_bufs, [True] * len(sizes), 3.0, lr=0.1,
                                             weight_decay=0.01, momentum=0.9, dampening=0.0, nesterov=True,
                                             maximize=False, grad_scale=0.5, max_norm=1.0, skip_nonfinite=True,
                                             dtype=param_dtype)
    for i, (p, e) in enumerate(zip(params, want_p)):
        assert_close(p, e, param_dtype, f"params[{i}]")
    for i, (b, e) in enumerate(zip(bufs, want_b)):
        assert_close(b, e, param_dtype, f"momentum_buffers[{i}]")
