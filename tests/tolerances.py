"""The one tolerance table of the suite, by dtype, and the assert helpers built on it."""
import math

import torch

# (rtol, atol) per storage dtype. fp32/fp64: a few ulps of float math against a float64
# reference. fp16/bf16: the reference rounds to the storage dtype too, so the residue is a
# rounding-boundary flip (1 ulp = 2^-10 / 2^-7 relative) per stored value, allowing it to
# compound over the few steps a test runs.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (4 * 2.0 ** -10, 2e-3),
    torch.bfloat16: (4 * 2.0 ** -7, 2e-2),
}


def tol(dtype):
    return TOLERANCES[dtype]


def loosest(dtypes):
    # The dtype whose tolerance judges a value computed from several dtypes (e.g. a global norm).
    return max(dtypes, key=lambda d: tol(d)[0])


def assert_close(actual, expected, dtype=None, msg=""):
    """actual (tensor) vs expected (float64 tensor or float) within dtype's tolerance;
    NaN/inf must match exactly in position."""
    actual_t = torch.as_tensor(actual).detach().cpu()
    dtype = dtype or actual_t.dtype
    rtol, atol = tol(dtype)
    expected_t = torch.as_tensor(expected, dtype=torch.float64).detach().cpu()
    actual64 = actual_t.to(torch.float64)
    assert actual64.shape == expected_t.shape, f"{msg}: shape {tuple(actual64.shape)} != {tuple(expected_t.shape)}"
    torch.testing.assert_close(actual64, expected_t, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{msg} [{dtype}]: {m}")


def assert_scalar_close(actual, expected, dtype, msg=""):
    """A 0-dim result (norm) vs a float: exact for NaN/inf, tolerance otherwise."""
    value = float(torch.as_tensor(actual).detach().cpu())
    if math.isnan(expected) or math.isinf(expected):
        assert (math.isnan(value) and math.isnan(expected)) or value == expected, f"{msg}: {value} != {expected}"
        return
    rtol, atol = tol(dtype)
    assert abs(value - expected) <= atol + rtol * abs(expected), f"{msg} [{dtype}]: {value!r} != {expected!r}"


def assert_bitwise(a, b, msg=""):
    # Bit-identical (NaN payload aside): same dtype, shape, and equal values incl. NaN positions.
    assert a.dtype == b.dtype and a.shape == b.shape, f"{msg}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    raw_a = a.detach().cpu().contiguous().view(-1).view(torch.uint8)
    raw_b = b.detach().cpu().contiguous().view(-1).view(torch.uint8)
    assert torch.equal(raw_a, raw_b), f"{msg}: not bitwise equal"
