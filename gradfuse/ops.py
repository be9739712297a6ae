"""Typed Python entry points for the gradfuse ops, plus their fake (meta) implementations
so the ops can be traced by torch.compile / FakeTensor."""
import math
from typing import List, Optional, Sequence

import torch

from . import _native  # noqa: F401  (registers torch.ops.gradfuse)

NORM_STATE_SIZE = 2  # [running value (sum of squares or max |x|), non-finite flag], float64


def new_norm_state(device) -> torch.Tensor:
    """A zeroed norm accumulator for accumulate_/accumulate_norm_/finalize_norm_."""
    return torch.zeros(NORM_STATE_SIZE, dtype=torch.float64, device=device)


def merge_norm_state_(state: torch.Tensor, other: torch.Tensor, norm_type: float) -> None:
    """state += other for two norm states on one device: running values summed (2-norm) or maxed
    (inf-norm), flags maxed; NaN propagates (torch.maximum keeps it). No host sync."""
    if math.isinf(norm_type):
        state[:1].copy_(torch.maximum(state[:1], other[:1]))
    else:
        state[:1].add_(other[:1])
    state[1:].copy_(torch.maximum(state[1:], other[1:]))


def accumulate_(accs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float = 1.0,
                first: bool = False, norm_state: Optional[torch.Tensor] = None, norm_type: float = 2.0,
                amp_scale: Optional[torch.Tensor] = None, tensor_norms: Optional[torch.Tensor] = None) -> None:
    """accs[i] = (0 if first else accs[i]) + scale * grads[i]; with norm_state, also adds the
    norm partial of the new accs (and a non-finite flag) into it, in the same pass. With
    amp_scale (GradScaler's float32 scale) the grads are unscaled on the fly, on the device. With
    tensor_norms (float64, one per tensor; CPU so far) each new acc's own partial is added there."""
    torch.ops.gradfuse.accumulate_(list(accs), list(grads), float(scale), bool(first), norm_state, float(norm_type),
                                   amp_scale, tensor_norms)


def accumulate_norm_(norm_state: torch.Tensor, tensors: Sequence[torch.Tensor], norm_type: float = 2.0,
                     tensor_norms: Optional[torch.Tensor] = None) -> None:
    """Adds the norm partial of tensors (and a non-finite flag) into norm_state, and each tensor's
    own partial into tensor_norms when given."""
    torch.ops.gradfuse.accumulate_norm_(norm_state, list(tensors), float(norm_type), tensor_norms)


def finalize_norm_(norm_state: torch.Tensor, skipped_steps: torch.Tensor, norm_type: float = 2.0,
                   scale: float = 1.0, count_nonfinite: bool = False) -> torch.Tensor:
    """0-dim float64 total norm times scale; resets norm_state; counts a non-finite norm."""
    return torch.ops.gradfuse.finalize_norm_(norm_state, skipped_steps, float(norm_type), float(scale),
                                             bool(count_nonfinite))


def global_norm(tensors: Sequence[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """norm_type norm (2 or inf) of all tensors together, as a 0-dim float64 tensor, no host sync."""
    return torch.ops.gradfuse.global_norm(list(tensors), float(norm_type))


def clipped_sgd_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      momentum_buffers: Sequence[torch.Tensor], momentum_initialized: Sequence[torch.Tensor],
                      total_norm: torch.Tensor, lr, weight_decay: float = 0.0, momentum: float = 0.0,
                      dampening: float = 0.0, nesterov: bool = False, maximize: bool = False,
                      grad_scale: float = 1.0, max_norm: Optional[float] = None,
                      skip_nonfinite: bool = True) -> None:
    """One pass: clip factor min(1, max_norm / (total_norm + 1e-6)) and the non-finite skip
    decision from total_norm (on the device), then torch.optim.SGD's update with
    grads * grad_scale. lr is a float or a 1-element tensor on the params' device."""
    lr_tensor, lr_value, max_norm_value = step_scalars(lr, max_norm)
    torch.ops.gradfuse.clipped_sgd_step_(
        list(params), list(grads), list(momentum_buffers), list(momentum_initialized), total_norm, lr_tensor,
        lr_value, float(weight_decay), float(momentum), float(dampening), bool(nesterov), bool(maximize),
        float(grad_scale), max_norm_value, bool(skip_nonfinite))


def clipped_adamw_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                        exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                        max_exp_avg_sqs: Sequence[torch.Tensor], state_steps: Sequence[torch.Tensor],
                        total_norm: torch.Tensor, lr, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                        weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False,
                        grad_scale: float = 1.0, max_norm: Optional[float] = None,
                        skip_nonfinite: bool = True) -> None:
    """One pass: clip factor and skip decision from total_norm (on the device, as for SGD), then
    torch.optim.AdamW's update with grads * grad_scale; each state_steps[i] (0-dim float32 or
    float64 on the params' device) goes up by one unless the step is skipped, and tensor i's bias
    corrections use the new count. max_exp_avg_sqs is used only with amsgrad (else pass [])."""
    lr_tensor, lr_value, max_norm_value = step_scalars(lr, max_norm)
    torch.ops.gradfuse.clipped_adamw_step_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(state_steps),
        total_norm, lr_tensor, lr_value, float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad),
        bool(maximize), float(grad_scale), max_norm_value, bool(skip_nonfinite))


def step_scalars(lr, max_norm):
    """The schema's (lr_tensor, lr, max_norm) for a float or tensor lr and an optional max_norm."""
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    return lr_tensor, 0.0 if lr_tensor is not None else float(lr), 0.0 if max_norm is None else float(max_norm)


@torch.library.register_fake("gradfuse::accumulate_")
def _accumulate_fake(accs: List[torch.Tensor], grads: List[torch.Tensor], scale: float, first: bool,
                     norm_state: Optional[torch.Tensor], norm_type: float,
                     amp_scale: Optional[torch.Tensor] = None, tensor_norms: Optional[torch.Tensor] = None) -> None:
    return None


@torch.library.register_fake("gradfuse::accumulate_norm_")
def _accumulate_norm_fake(norm_state: torch.Tensor, tensors: List[torch.Tensor], norm_type: float,
                          tensor_norms: Optional[torch.Tensor] = None) -> None:
    return None


@torch.library.register_fake("gradfuse::finalize_norm_")
def _finalize_norm_fake(norm_state, skipped_steps, norm_type, scale, count_nonfinite):
    return norm_state.new_empty(())


@torch.library.register_fake("gradfuse::global_norm")
def _global_norm_fake(tensors, norm_type):
    torch._check(len(tensors) > 0, lambda: "gradfuse::global_norm: tensors is empty")
    return tensors[0].new_empty((), dtype=torch.float64)


@torch.library.register_fake("gradfuse::clipped_sgd_step_")
def _clipped_sgd_step_fake(params, grads, momentum_buffers, momentum_initialized, total_norm, lr_tensor, lr,
                           weight_decay, momentum, dampening, nesterov, maximize, grad_scale, max_norm,
                           skip_nonfinite) -> None:
    return None


@torch.library.register_fake("gradfuse::clipped_adamw_step_")
def _clipped_adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, total_norm, lr_tensor,
                             lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, max_norm,
                             skip_nonfinite) -> None:
    return None
