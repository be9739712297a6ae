"""NaN and +/-inf at the LAST element of a tensor: for lengths 1, 7, 33 and 65537 that element is in
the scalar tail after the vector loop on every vector width (4, 8, 16 lanes) and CUDA vector load,
where a NaN check dropped from the tail is invisible to a value at a random index."""
import math

import pytest
import torch

import reference as ref
from data import DTYPES, randn
from gradfuse import ops

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
INF = math.inf
LENGTHS = [1, 7, 33, 65537]
BAD = {"nan": math.nan, "inf": INF, "-inf": -INF}
# (accumulator dtype, gradient dtype): the optimizer's float32 accumulators for half gradients, and same-dtype.
ACC_PAIRS = [(F32, F32), (F64, F64), (F16, F16), (BF16, BF16), (F32, F16), (F32, BF16)]


def tail_bad(n, dtype, device, gen, bad):
    # Fresh random values with the non-finite one at the last index.
    t = randn((n,), dtype, device, gen)
    t[-1] = bad
    return t


def finite_neighbours(dtype, device, gen):
    # Finite tensors before and after the bad one: the flag and NaN must survive the merge.
    return randn((5,), dtype, device, gen), randn((3,), dtype, device, gen)


def assert_norm_is(result, bad, what):
    value = float(result)
    if math.isnan(bad):
        assert math.isnan(value), f"{what}: {value} (expected NaN)"
    else:
        assert value == INF, f"{what}: {value} (expected inf)"  # |-inf| is inf in both norms


@pytest.mark.parametrize("norm_type", [2.0, INF], ids=["l2", "linf"])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_global_norm_tail(device, gen, dtype, n, bad, norm_type):
    before, after = finite_neighbours(dtype, device, gen)
    tensors = [before, tail_bad(n, dtype, device, gen, BAD[bad]), after]
    assert_norm_is(ops.global_norm(tensors, norm_type), BAD[bad], "global_norm")
    assert_norm_is(ops.global_norm(tensors[1:2], norm_type), BAD[bad], "global_norm of the tensor alone")


@pytest.mark.parametrize("norm_type", [2.0, INF], ids=["l2", "linf"])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_norm_tail(device, gen, dtype, n, bad, norm_type):
    before, after = finite_neighbours(dtype, device, gen)
    tensors = [before, tail_bad(n, dtype, device, gen, BAD[bad]), after]
    state = torch.tensor([0.25, 0.0], dtype=F64, device=device)
    ops.accumulate_norm_(state, tensors, norm_type)
    want = ref.merge_norm_state([0.25, 0.0], tensors, norm_type)
    assert float(state[1]) == 1.0, "non-finite flag not set"
    assert_norm_is(state[0], want[0], "norm_state[0]")
    assert_norm_is(ops.finalize_norm_(state, torch.zeros((), dtype=torch.int64, device=device), norm_type, 1.0, True),
                   BAD[bad], "finalize_norm_")


@pytest.mark.parametrize("norm_type", [2.0, INF], ids=["l2", "linf"])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("pair", ACC_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-{str(p[1])[6:]}")
def test_accumulate_tail(device, gen, pair, n, bad, norm_type):
    acc_dtype, grad_dtype = pair
    before, after = finite_neighbours(grad_dtype, device, gen)
    grads = [before, tail_bad(n, grad_dtype, device, gen, BAD[bad]), after]
    accs = [randn(g.shape, acc_dtype, device, gen) for g in grads]
    state = torch.zeros(2, dtype=F64, device=device)
    ops.accumulate_(accs, grads, 0.5, False, state, norm_type)
    last = float(accs[1][-1])
    assert (math.isnan(last) if math.isnan(BAD[bad]) else last == BAD[bad]), f"accs[1][-1] = {last}"
    assert torch.isfinite(accs[1][:-1]).all() and torch.isfinite(accs[0]).all() and torch.isfinite(accs[2]).all()
    assert float(state[1]) == 1.0, "non-finite flag not set"
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    assert_norm_is(ops.finalize_norm_(state, skipped, norm_type, 0.25, True), BAD[bad], "finalize_norm_")
    assert int(skipped) == 1, "the non-finite cycle was not counted"
