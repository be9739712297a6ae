"""Independent float64 reference of gradfuse's clipped_adamw_step_ (plain PyTorch; it must never
import gradfuse, so a bug there cannot leak into the expected values)."""
import math

import torch

from reference import as64, clip_factor  # noqa: F401  (the SGD reference's, shared: no gradfuse code)


def adamw_update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, *, lr, beta1, beta2, eps,
                 weight_decay, amsgrad):
    """torch.optim.AdamW's single-tensor update in float64 for a gradient already clipped, scaled
    and negated; `step` is the incremented count. Returns the new tensors and, for the tests'
    error model, the magnitude of the terms each result was formed from."""
    decayed = param * (1 - lr * weight_decay)
    new_avg = exp_avg + (1 - beta1) * (grad - exp_avg)
    new_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    new_max = torch.maximum(max_exp_avg_sq, new_sq) if amsgrad else None
    step_size = lr / (1 - beta1 ** step)
    denom = (new_max if amsgrad else new_sq).sqrt() / math.sqrt(1 - beta2 ** step) + eps
    update = step_size * new_avg / denom
    avg_terms = (beta1 * exp_avg).abs() + ((1 - beta1) * grad).abs()
    terms = dict(exp_avg=avg_terms, exp_avg_sq=beta2 * exp_avg_sq + (1 - beta2) * grad * grad,
                 param=decayed.abs() + step_size * avg_terms / denom + update.abs())
    if amsgrad:
        terms["max_exp_avg_sq"] = torch.maximum(max_exp_avg_sq, terms["exp_avg_sq"])
    return dict(param=decayed - update, exp_avg=new_avg, exp_avg_sq=new_sq, max_exp_avg_sq=new_max), terms


def clipped_adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, norm, *, lr, beta1, beta2,
                       eps, weight_decay, amsgrad, maximize, grad_scale, max_norm, skip_nonfinite):
    """clipped_adamw_step_'s result in float64 (unrounded): a list with one dict per tensor of
    param, exp_avg, exp_avg_sq, max_exp_avg_sq (None without amsgrad) and step (float), and a
    list of the term magnitudes per tensor (None when the step is skipped)."""
    n = len(params)
    max_exp_avg_sqs = max_exp_avg_sqs if amsgrad else [None] * n
    if skip_nonfinite and not math.isfinite(norm):
        same = [dict(param=as64(p), exp_avg=as64(m), exp_avg_sq=as64(v),
                     max_exp_avg_sq=None if vm is None else as64(vm), step=float(s))
                for p, m, v, vm, s in zip(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)]
        return same, [None] * n
    factor = (-1.0 if maximize else 1.0) * grad_scale * clip_factor(norm, max_norm)
    results, terms = [], []
    for p, g, m, v, vm, s in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps):
        step = float(s) + 1
        new, term = adamw_update(as64(p), as64(g) * factor, as64(m), as64(v), None if vm is None else as64(vm),
                                 step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                 amsgrad=amsgrad)
        new["step"] = step
        results.append(new)
        terms.append(term)
    return results, terms
