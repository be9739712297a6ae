"""Independent float64 reference of gradfuse's ops and of FusedAccumSGD (plain PyTorch; it
must never import gradfuse, so a bug there cannot leak into the expected values)."""
import math

import torch

F64 = torch.float64
CLIP_EPS = 1e-6  # the constant torch.nn.utils.clip_grad_norm_ adds to the norm


def as64(t):
    # Exact widening: every float16/bfloat16/float32 value is representable in float64.
    return t.detach().to(device="cpu", dtype=F64).clone()


def round_to(x, dtype):
    # Emulates storing a float64 value in `dtype` (the only rounding the reference models).
    return x if dtype is None or dtype == F64 else x.to(dtype).to(F64)


def norm_partial(tensors, norm_type):
    """(running value, nonfinite) of float64 copies: sum of squares for 2, max |x| for inf."""
    flat = [as64(t).reshape(-1) for t in tensors]
    flat = torch.cat(flat) if flat else torch.zeros(0, dtype=F64)
    nonfinite = bool((~torch.isfinite(flat)).any())
    if flat.numel() == 0:
        return 0.0, nonfinite
    if torch.isnan(flat).any():
        return math.nan, True
    if math.isinf(norm_type):
        return float(flat.abs().max()), nonfinite
    return float(flat.square().sum()), nonfinite


def total_norm(tensors, norm_type):
    """norm_type norm of all tensors together (clip_grad_norm_'s total), float64."""
    value, _ = norm_partial(tensors, norm_type)
    return value if math.isinf(norm_type) else math.sqrt(value)


def merge_norm_state(state, tensors, norm_type):
    """norm_state [value, flag] after adding the partial of tensors (accumulate_norm_ semantics)."""
    value, nonfinite = norm_partial(tensors, norm_type)
    old, flag = float(state[0]), float(state[1])
    if math.isinf(norm_type):
        merged = math.nan if (math.isnan(old) or math.isnan(value)) else max(old, value)
    else:
        merged = old + value
    return [merged, 1.0 if (flag or nonfinite or not math.isfinite(value)) else 0.0]


def finalize(state, norm_type, scale):
    """finalize_norm_'s result: root of the running value times scale; NaN if a non-finite
    value was flagged but the result came out finite."""
    value, flag = float(state[0]), float(state[1])
    norm = (value if math.isinf(norm_type) else math.sqrt(value) if value >= 0 or math.isnan(value) else math.nan)
    norm *= scale
    if flag and math.isfinite(norm):
        norm = math.nan
    return norm


def accumulate(accs, grads, scale, first, acc_dtype):
    """accumulate_'s new accumulators: (0 if first else acc) + scale * grad, stored in acc_dtype."""
    out = []
    for acc, grad in zip(accs, grads):
        base = torch.zeros_like(as64(grad)) if first else as64(acc)
        out.append(round_to(base + scale * as64(grad), acc_dtype))
    return out


def sgd_update(param, grad, buf, *, lr, weight_decay, momentum, dampening, nesterov, maximize):
    """torch.optim.SGD's single-tensor update in float64; returns (param, buf)."""
    d = -grad if maximize else grad
    if weight_decay != 0:
        d = d + weight_decay * param
    if momentum != 0:
        buf = d.clone() if buf is None else momentum * buf + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return param - lr * d, buf


def clip_factor(norm, max_norm):
    # clip_grad_norm_'s coefficient, clamped to 1; no clipping when max_norm is None/0.
    if not max_norm:
        return 1.0
    if math.isnan(norm):
        return math.nan  # torch.clamp keeps NaN (Python's min would drop it)
    return min(1.0, max_norm / (norm + CLIP_EPS))


def clipped_sgd_step(params, grads, bufs, initialized, norm, *, lr, weight_decay, momentum, dampening,
                     nesterov, maximize, grad_scale, max_norm, skip_nonfinite, dtype=None):
    """clipped_sgd_step_'s (params, bufs, initialized) in float64, rounded to `dtype` storage."""
    if skip_nonfinite and not math.isfinite(norm):
        return [as64(p) for p in params], [None if b is None else as64(b) for b in bufs], list(initialized)
    factor = grad_scale * clip_factor(norm, max_norm)
    new_params, new_bufs = [], []
    for p, g, b, init in zip(params, grads, bufs, initialized):
        buf = as64(b) if (momentum != 0 and init) else None
        new_p, new_b = sgd_update(as64(p), as64(g) * factor, buf, lr=lr, weight_decay=weight_decay,
                                  momentum=momentum, dampening=dampening, nesterov=nesterov, maximize=maximize)
        new_params.append(round_to(new_p, dtype))
        new_bufs.append(None if new_b is None else round_to(new_b, dtype))
    return new_params, new_bufs, [init or momentum != 0 for init in initialized]


GROUP_DEFAULTS = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)


class ReferenceAccumSGD:
    """FusedAccumSGD's semantics in float64. params: initial tensors; groups: list of dicts with
    'params' (indices into params) and SGD hyperparameters; step(grads) takes one micro-batch's
    gradients (None = no gradient). storage: per-param dtype the stored params/buffers are
    rounded to (None = pure float64); acc_storage: likewise for the accumulators."""

    def __init__(self, params, groups, *, accumulation_steps=1, max_grad_norm=None, norm_type=2.0,
                 skip_nonfinite=True, storage=None, acc_storage=None):
        self.params = [as64(p) for p in params]
        self.groups = [dict(GROUP_DEFAULTS, **g) for g in groups]
        self.k = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.norm_type = float(norm_type)
        self.skip_nonfinite = skip_nonfinite
        self.storage = storage or [None] * len(self.params)
        self.acc_storage = acc_storage or [None] * len(self.params)
        self.buffers = [None] * len(self.params)
        self.accs = [None] * len(self.params)
        self.micro_step = 0
        self.skipped_steps = 0
        self.last_grad_norm = None
        self.updated = [False] * len(self.params)  # ever changed by a completed cycle
        self.norms = []  # pre-clip total norm of every completed cycle

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is not None:
                base = self.accs[i] if self.accs[i] is not None else torch.zeros_like(self.params[i])
                self.accs[i] = round_to(base + as64(g), self.acc_storage[i])  # the running sum
        self.micro_step += 1
        if self.micro_step == self.k:
            self._finish_cycle()

    def _finish_cycle(self):
        present = [i for i, a in enumerate(self.accs) if a is not None]
        averaged = {i: self.accs[i] / self.k for i in present}  # A = sum(grad) / K
        norm = total_norm([averaged[i] for i in present], self.norm_type) if present else 0.0
        self.last_grad_norm = norm
        self.norms.append(norm)
        if not math.isfinite(norm) and self.skip_nonfinite:
            self.skipped_steps += 1
        else:
            factor = clip_factor(norm, self.max_grad_norm)
            for group in self.groups:
                hyper = {k: group[k] for k in GROUP_DEFAULTS}
                for i in group["params"]:
                    if i not in averaged:
                        continue  # no gradient in the whole cycle: untouched, as in torch.optim.SGD
                    p, b = sgd_update(self.params[i], averaged[i] * factor, self.buffers[i], **hyper)
                    self.params[i] = round_to(p, self.storage[i])
                    self.buffers[i] = None if b is None else round_to(b, self.storage[i])
                    self.updated[i] = True
        self.accs = [None] * len(self.params)
        self.micro_step = 0

    @property
    def sync_gradients(self):
        return self.micro_step + 1 == self.k
