"""Validation of FusedAccumSGD's hyperparameters, as strict as torch.optim.SGD's (and
stricter about NaN), with messages that name the bad value."""
import math
import numbers

import torch

# Hyperparameters that apply to the whole optimizer (the global norm spans every group).
OPTIMIZER_WIDE = ("accumulation_steps", "max_grad_norm", "norm_type", "skip_nonfinite", "error_if_nonfinite",
                  "accum_dtype", "process_group", "accumulate_in_backward", "flat_buffers", "clip", "skip",
                  "track_param_norms", "sum_in_grad")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def real_number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _non_negative(name, value, label):
    number = real_number(name, value)
    if not number >= 0.0 or math.isinf(number):
        raise ValueError(f"Invalid {label} value: {value}")
    return number


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_lr(lr, check_tensor_value=True):
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise TypeError(f"Tensor lr must be floating point, got {lr.dtype}")
        if check_tensor_value:  # reads the value: done at construction, not per step
            check_lr(lr.item())
        return
    number = real_number("lr", lr)
    if not number >= 0.0 or math.isinf(number):
        raise ValueError(f"Invalid learning rate: {lr}")


def check_not_optimizer_wide(group, name):
    for key in OPTIMIZER_WIDE:
        if key in group:
            raise ValueError(f"{key} is optimizer-wide (the global norm spans every group): pass it to "
                             f"{name}(...), not in a parameter group")


def check_sgd_group(group, check_tensor_lr=True):
    """Per-group SGD hyperparameters (lr, momentum, dampening, weight_decay, nesterov, maximize)."""
    check_not_optimizer_wide(group, "FusedAccumSGD")
    check_lr(group["lr"], check_tensor_lr)
    momentum = _non_negative("momentum", group["momentum"], "momentum")
    _non_negative("weight_decay", group["weight_decay"], "weight_decay")
    dampening = real_number("dampening", group["dampening"])
    if not math.isfinite(dampening):
        raise ValueError(f"Invalid dampening value: {group['dampening']}")
    nesterov = check_flag("nesterov", group["nesterov"])
    check_flag("maximize", group["maximize"])
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def check_adamw_group(group, check_tensor_lr=True):
    """Per-group AdamW hyperparameters (lr, betas, eps, weight_decay, amsgrad, maximize), as
    torch.optim.AdamW validates them, except that eps must be > 0 (0 can divide by zero)."""
    check_not_optimizer_wide(group, "FusedAccumAdamW")
    check_lr(group["lr"], check_tensor_lr)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    tensors = [isinstance(beta, torch.Tensor) for beta in betas]
    if any(tensors) and not all(tensors):  # torch.optim.AdamW's rule
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):  # read on the host once per update (a CUDA tensor syncs)
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")
            if not check_tensor_lr:
                continue  # per step: the value was checked when the group was added
            beta = beta.item()
        value = real_number(f"betas[{index}]", beta)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    eps = real_number("eps", group["eps"])
    if not 0.0 < eps < math.inf:
        raise ValueError(f"Invalid epsilon value: {group['eps']} (must be > 0 and finite)")
    _non_negative("weight_decay", group["weight_decay"], "weight_decay")
    check_flag("amsgrad", group["amsgrad"])
    check_flag("maximize", group["maximize"])


def check_accumulation_steps(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"accumulation_steps must be an integer >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"accumulation_steps must be an integer >= 1, got {value}")
    return int(value)


def check_max_grad_norm(value):
    if value is None:
        return None
    number = real_number("max_grad_norm", value)
    if not number > 0.0:
        raise ValueError(f"max_grad_norm must be None (no clipping) or > 0, got {value}")
    return number


def check_norm_type(value):
    if isinstance(value, str) and value.lower() == "inf":
        return math.inf
    number = real_number("norm_type", value)
    if number not in (2.0, math.inf):
        raise ValueError(f"norm_type must be 2.0 or inf (as in clip_grad_norm_), got {value}")
    return number


def check_accum_dtype(value):
    if value is not None and value not in SUPPORTED_DTYPES:
        raise ValueError(f"accum_dtype must be None or one of {SUPPORTED_DTYPES}, got {value}")
    return value


def check_policies(clip, skip, max_grad_norm):
    """The cycle policies, each the optimizer's own copy (its state is the optimizer's)."""
    import copy

    from .clip_policy import ClipPolicy
    from .spike_skip import SpikeSkip

    if clip is not None and not isinstance(clip, ClipPolicy):
        raise TypeError(f"clip must be None or a clip policy such as gradfuse.ZClip(...), got {type(clip).__name__}")
    if clip is not None and max_grad_norm is not None:
        raise ValueError("clip= and max_grad_norm= exclude each other: max_grad_norm= is the fixed threshold; "
                         "cap an adaptive one with its own max_grad_norm (gradfuse.ZClip(max_grad_norm=...))")
    if skip is not None and not isinstance(skip, SpikeSkip):
        raise TypeError(f"skip must be None or gradfuse.SpikeSkip(...), got {type(skip).__name__}")
    return copy.deepcopy(clip), copy.deepcopy(skip)


def check_loss(loss, name):
    """step(loss=...): a real number or a 1-element real tensor (kept on its device)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1 or loss.is_complex() or not (loss.is_floating_point() or loss.dtype != torch.bool):
            raise ValueError(f"{name}.step(loss=...): loss must be a 1-element real tensor, got {loss.dtype} of "
                             f"shape {tuple(loss.shape)}")
        return loss.detach().reshape(())
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"{name}.step(loss=...): loss must be a number or a 1-element tensor, got "
                        f"{type(loss).__name__}")
    return torch.tensor(float(loss), dtype=torch.float64)


def check_process_group(group):
    """None, or the torch.distributed group over which plain (non-DTensor) parameters are sharded."""
    if group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be None or a torch.distributed.ProcessGroup (the ranks that each "
                        f"own a disjoint part of the parameters), got {type(group).__name__}")
    return group


def accumulator_dtype(param_dtype, accum_dtype):
    """The dtype gradients of a param_dtype parameter accumulate in: float32 for half types
    (unless accum_dtype overrides), the parameter's own dtype otherwise."""
    reduced = param_dtype in (torch.float16, torch.bfloat16)
    if accum_dtype is None:
        return torch.float32 if reduced else param_dtype
    if accum_dtype == param_dtype or (accum_dtype == torch.float32 and reduced):
        return accum_dtype
    raise ValueError(f"accum_dtype={accum_dtype} cannot accumulate {param_dtype} parameters; use None, the "
                     f"parameter dtype, or torch.float32 for float16/bfloat16 parameters")
