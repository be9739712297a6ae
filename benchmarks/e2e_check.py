"""Numerics of the end-to-end rows: after the timed runs, each gradfuse mode and torch's loop train
fresh copies of the same model on the same micro-batches for CHECK_UPDATES updates, and the
parameters must agree: |p_gradfuse - p_torch| <= ULPS_PER_UPDATE * CHECK_UPDATES ulps of p_torch (each
update rounds p - lr * d in its own order) + RTOL * max |p_torch - p_start| (torch's float32 norm is
less exact than gradfuse's float64 one, so the clip factors differ), at a learning rate (CHECK_LR)
where the changes are thousands of ulps of the weights, so a wrong scale, clip or momentum is far
outside the tolerance.
(The timed models cannot be compared: each mode ran a different number of updates.) The pre-clip
norm is recorded so the row shows whether clipping was active in the check."""
import copy

import torch

from . import e2e_models
from .e2e_loops import GRADFUSE_OPTIONS, OptimizerClock, make_optimizer, update

CHECK_UPDATES = 2  # the second update uses the momentum the first one built
# torch's float32 CPU norm of one 4096 x 4096 gradient is 7.5e-4 off the float64 norm (gradfuse's):
# the clip factor, and so every update, differ by that much; a wrong 1/K, clip or momentum is >= 40%.
RTOL = 2e-3
ULPS_PER_UPDATE = 4  # float32 roundings of the update's multiply-adds, as in tests/tolerances.py
CHECK_LR = 0.1  # updates far above an ulp of the weights: with the timed lr=1e-4 they would be rounding noise


def _trained(mode, base, data):
    """The parameters before and after CHECK_UPDATES updates of one mode, and the last pre-clip norm."""
    model = copy.deepcopy(base)  # every mode from the same weights
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]  # before flat_buffers rebinds them
    opt = make_optimizer(mode, model, len(data), lr=CHECK_LR)
    for _ in range(CHECK_UPDATES):
        update(mode, model, params, opt, data, OptimizerClock())
    norm = getattr(opt, "last_grad_norm", None)
    return start, [p.detach().clone() for p in params], None if norm is None else float(norm)


def _ulp(x):
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x


def check(name, quick, device, data, torch_mode):
    """dict(max_err: {mode: worst |difference| / tolerance}, ok, ...) for every gradfuse mode vs torch_mode."""
    base, _ = e2e_models.build(name, quick, device)
    start, reference, _ = _trained(torch_mode, base, data)
    max_update = max(float((r - s).abs().max()) for r, s in zip(reference, start))
    tolerance = [ULPS_PER_UPDATE * CHECK_UPDATES * _ulp(r) + RTOL * max_update for r in reference]
    errors, norm = {}, None
    for mode in GRADFUSE_OPTIONS:
        _, params, norm = _trained(mode, base, data)
        errors[mode] = max(float(((p - r).abs() / t).max()) for p, r, t in zip(params, reference, tolerance))
        del params
    return dict(max_err=errors, ok=all(e <= 1.0 for e in errors.values()), against=torch_mode, updates=CHECK_UPDATES,
                lr=CHECK_LR, rtol=RTOL, ulps=ULPS_PER_UPDATE * CHECK_UPDATES, grad_norm=norm, max_update=max_update)
