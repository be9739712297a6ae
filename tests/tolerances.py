"""The one tolerance table of the suite, in ulps of the storage type, and the assert helpers built on it.

THE RULE: a result that is a float32 computation rounded once to its storage type must be within
1 ulp of the float64 reference rounded once to that type. (float32's own error is far below half
an ulp of fp16/bf16, so the two roundings can only land on the two sides of one boundary.)
Every number looser than that names, next to it, the extra rounding the algorithm does there.

A tolerance is `ulps` of the storage type at the expected value plus an absolute `floor` for
operands of magnitude 1 (assert_close scales it): a result that cancels to near zero keeps the
rounding error of its O(1) operands, which is larger than an ulp of the tiny result.
"""
import math
from dataclasses import dataclass

import torch

F32_EPS = torch.finfo(torch.float32).eps  # 1 float32 ulp at 1.0
F64_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Tolerance:
    ulps: float  # ulps of the storage dtype at the expected value
    floor: float  # absolute, for operands of magnitude 1


# One op, one pass: the value a kernel stores.
ONCE = {
    # The rule. Floor: float32's own rounding of the O(1) operands, seen when the result cancels.
    torch.float16: Tolerance(1, 4 * F32_EPS),
    torch.bfloat16: Tolerance(1, 4 * F32_EPS),
    # float32/float64 round after every operation of the update (grad * mult, the fused
    # multiply-adds + wd * p, momentum blend after momentum * buf, nesterov, p - lr * d: up to 6
    # roundings) and of acc + scale * grad (2), not once.
    torch.float32: Tolerance(4, 8 * F32_EPS),
    torch.float64: Tolerance(4, 8 * F64_EPS),
}


def after_cycles(cycles):
    """The table for parameters/momentum after `cycles` optimizer cycles: each cycle rounds them once
    and its 1-ulp flip is the next cycle's input (the reference continues from its own rounded
    values), so the allowance grows by ONCE per cycle; a flip carried over is an ulp of an O(1)
    operand, which a cancelling momentum blend or update leaves on a smaller result (the floor)."""
    c = max(cycles, 1)
    return {dtype: Tolerance(c * t.ulps, c * t.floor + (c - 1) * t.ulps * eps(dtype)) for dtype, t in ONCE.items()}


# A norm (float64) of stored values vs the reference's norm of its own stored values: each value
# may differ by its ONCE allowance, and a square doubles that relative difference.
NORM_ULPS = {dtype: 2 * t.ulps for dtype, t in ONCE.items()}


def eps(dtype):
    return torch.finfo(dtype).eps


def ulp_of(x, dtype):
    """Spacing of dtype's representable values at |x| (float64 tensor in, float64 tensor out);
    subnormals keep the spacing of the smallest normal binade."""
    info = torch.finfo(dtype)
    magnitude = x.abs().clamp(min=info.tiny)
    _, exponent = torch.frexp(magnitude)  # magnitude = m * 2**exponent with m in [0.5, 1)
    return torch.ldexp(torch.full_like(magnitude, info.eps), exponent - 1)


def round_to(x, dtype):
    # The reference's one rounding to the storage type (idempotent on already-rounded values).
    return x if dtype == torch.float64 else x.to(dtype).to(torch.float64)


def ulp_distance(actual, expected, dtype):
    """|actual - expected rounded to dtype| in ulps of dtype at the expected value (float64)."""
    expected_r = round_to(expected, dtype)
    return (actual - expected_r).abs() / ulp_of(expected_r, dtype)


def tol(dtype, table=None):
    return (table or ONCE)[dtype]


def tol_at_unit_scale(dtype, table=None):
    # The absolute allowance for a value of magnitude 1 (e.g. "did it move by more than the noise").
    rule = tol(dtype, table)
    return rule.ulps * eps(dtype) + rule.floor


def loosest(dtypes):
    # The dtype whose tolerance judges a value computed from several dtypes (e.g. a global norm).
    return max(dtypes, key=eps)


def assert_close(actual, expected, dtype=None, msg="", *, table=None, scale=1.0):
    """actual (tensor) vs expected (float64 tensor or float) within table[dtype] (ONCE by default):
    ulps of dtype at round(expected) plus the cancellation floor at `scale`, the operands'
    magnitude. NaN/inf must match exactly in position and value."""
    actual_t = torch.as_tensor(actual).detach().cpu()
    dtype = dtype or actual_t.dtype
    rule = tol(dtype, table)
    expected_t = torch.as_tensor(expected, dtype=torch.float64).detach().cpu()
    actual64 = actual_t.to(torch.float64)
    assert actual64.shape == expected_t.shape, f"{msg}: shape {tuple(actual64.shape)} != {tuple(expected_t.shape)}"
    expected_r = round_to(expected_t, dtype)
    finite = torch.isfinite(expected_r)
    same_nonfinite = (torch.isnan(actual64) & torch.isnan(expected_r)) | (actual64 == expected_r)
    bad = ~finite & ~same_nonfinite
    assert not bad.any(), (f"{msg} [{dtype}]: non-finite mismatch at {bad.nonzero()[:5].tolist()}: "
                           f"{actual64[bad][:5].tolist()} vs {expected_r[bad][:5].tolist()}")
    allowed = rule.ulps * ulp_of(expected_r, dtype) + rule.floor * scale
    error = (actual64 - expected_r).abs()
    over = finite & ~(error <= allowed)  # NaN where a finite value was expected counts as over
    if over.any():
        worst = int(torch.where(over, error / allowed, torch.zeros_like(error)).reshape(-1).argmax())
        ulps = float(ulp_distance(actual64.reshape(-1)[worst], expected_t.reshape(-1)[worst], dtype))
        raise AssertionError(
            f"{msg} [{dtype}]: {int(over.sum())} of {over.numel()} values beyond {rule}; worst at flat index "
            f"{worst}: {float(actual64.reshape(-1)[worst])!r} vs {float(expected_r.reshape(-1)[worst])!r} "
            f"({ulps:.1f} ulps)")


def assert_scalar_close(actual, expected, dtype, msg=""):
    """A 0-dim float64 result (norm) of values stored in dtype vs a float: exact for NaN/inf,
    NORM_ULPS of dtype relative to the expected value otherwise."""
    value = float(torch.as_tensor(actual).detach().cpu())
    if math.isnan(expected) or math.isinf(expected):
        assert (math.isnan(value) and math.isnan(expected)) or value == expected, f"{msg}: {value} != {expected}"
        return
    allowed = NORM_ULPS[dtype] * eps(dtype) * abs(expected) + torch.finfo(torch.float64).tiny
    assert abs(value - expected) <= allowed, f"{msg} [{dtype}]: {value!r} != {expected!r} (allowed {allowed:.3g})"


def assert_bitwise(a, b, msg=""):
    # Bit-identical (NaN payload aside): same dtype, shape, and equal values incl. NaN positions.
    assert a.dtype == b.dtype and a.shape == b.shape, f"{msg}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    raw_a = a.detach().cpu().contiguous().view(-1).view(torch.uint8)
    raw_b = b.detach().cpu().contiguous().view(-1).view(torch.uint8)
    assert torch.equal(raw_a, raw_b), f"{msg}: not bitwise equal"

