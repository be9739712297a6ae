"""The optimizer's per-step op calls. In plain eager execution they go straight into the native
kernels (gradfuse._C.direct: same kernels and checks, without the dispatcher's per-tensor boxing
of every list, which dominates a step over thousands of small tensors); under tracing, dispatch
or function modes, or with tensor subclasses that need Python dispatch, through torch.ops."""
import torch

from . import ops
from ._native import direct as _direct


def _eager():
    """No compiler, torch-function mode or dispatch mode that must see the ops."""
    return not (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled()
                or torch._C._len_torch_dispatch_stack() > 0)


def accumulate_(accs, grads, scale, first, norm_state, norm_type, amp_scale=None, tensor_norms=None):
    if not (_eager() and _direct.accumulate_(accs, grads, float(scale), bool(first), norm_state, float(norm_type),
                                             amp_scale, tensor_norms)):
        ops.accumulate_(accs, grads, scale, first, norm_state, norm_type, amp_scale, tensor_norms)


def accumulate_norm_(norm_state, tensors, norm_type, tensor_norms=None):
    if not (_eager() and _direct.accumulate_norm_(norm_state, tensors, float(norm_type), tensor_norms)):
        ops.accumulate_norm_(norm_state, tensors, norm_type, tensor_norms)


def clipped_sgd_step_(params, grads, momentum_buffers, momentum_initialized, total_norm, lr, weight_decay, momentum,
                      dampening, nesterov, maximize, grad_scale, max_norm, skip_nonfinite):
    lr_tensor, lr_value, max_norm_value = ops.step_scalars(lr, max_norm)
    if not (_eager() and _direct.clipped_sgd_step_(
            params, grads, momentum_buffers, momentum_initialized, total_norm, lr_tensor, lr_value,
            float(weight_decay), float(momentum), float(dampening), bool(nesterov), bool(maximize),
            float(grad_scale), max_norm_value, bool(skip_nonfinite))):
        ops.clipped_sgd_step_(params, grads, momentum_buffers, momentum_initialized, total_norm, lr, weight_decay,
                              momentum, dampening, nesterov, maximize, grad_scale, max_norm, skip_nonfinite)


def clipped_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, total_norm, lr, beta1,
                        beta2, eps, weight_decay, amsgrad, maximize, grad_scale, max_norm, skip_nonfinite):
    lr_tensor, lr_value, max_norm_value = ops.step_scalars(lr, max_norm)
    if not (_eager() and _direct.clipped_adamw_step_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, total_norm, lr_tensor, lr_value,
            float(beta1), float(beta2), float(eps), float(weight_decay), bool(amsgrad), bool(maximize),
            float(grad_scale), max_norm_value, bool(skip_nonfinite))):
        ops.clipped_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, total_norm, lr,
                                beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, max_norm,
                                skip_nonfinite)
