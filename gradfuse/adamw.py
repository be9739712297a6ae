"""FusedAccumAdamW: gradient accumulation + global-norm clipping + torch.optim.AdamW on the
shared core; a skipped cycle changes nothing, not the moments and not the step count, which
lives on the device (no host sync)."""
import numbers

import torch

from . import direct_ops
from . import hyperparameters as hp
from .core import FusedAccumOptimizer

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class FusedAccumAdamW(FusedAccumOptimizer):
    """torch.optim.AdamW with built-in gradient accumulation and global-norm clipping.

    Call step() once per micro-batch (and do not divide the loss by K: A below is already the
    mean): micro-steps 1..K-1 only accumulate A = sum(grad)/K;
    micro-step K computes the norm_type norm of A over all parameters, skips the cycle when it
    is not finite (skip_nonfinite: moments and step count untouched), scales A by
    min(1, max_grad_norm / (norm + 1e-6)) and applies AdamW's update (decoupled weight decay,
    bias corrections from each parameter's own step count, amsgrad, maximize) in one pass.

    Running sums of tensors of 64K elements and more stay as their .grad between micro-batches
    (autograd adds into them in place: torch's own loop's memory); sum_in_grad=False keeps every
    micro-batch's gradient apart from the sums (gradfuse/resident_store.py).

    flat_buffers=True keeps the parameters, their gradients and the per-element state as views of one
    flat buffer per (group, device, dtype): autograd accumulates in place and every pass is one call,
    however many tensors (for models of many small tensors; see gradfuse/flat_store.py).
    """

    _RULE = "AdamW"
    _GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    _STATE_KEYS = frozenset({"step", *_MOMENTS})
    _ELEMENT_KEYS = _MOMENTS
    _SLOT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
    _LEGACY_GROUP_DEFAULTS = {"maximize": False, "amsgrad": False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, accumulation_steps=1, max_grad_norm=None, norm_type=2.0, skip_nonfinite=True,
                 error_if_nonfinite=False, accum_dtype=None, process_group=None, accumulate_in_backward=False,
                 flat_buffers=False, clip=None, skip=None, track_param_norms=False, sum_in_grad=True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
                         norm_type=norm_type, skip_nonfinite=skip_nonfinite, error_if_nonfinite=error_if_nonfinite,
                         accum_dtype=accum_dtype, process_group=process_group,
                         accumulate_in_backward=accumulate_in_backward, flat_buffers=flat_buffers, clip=clip,
                         skip=skip, track_param_norms=track_param_norms, sum_in_grad=sum_in_grad)

    def _check_group(self, group, check_tensor_lr=True):
        hp.check_adamw_group(group, check_tensor_lr)

    def _required_slot_keys(self, group):
        return self._SLOT_KEYS if group["amsgrad"] else ("exp_avg", "exp_avg_sq", "step")

    def _new_param_state(self, p, group, state):
        # Zeros, step 0 (float32 on the parameter's device, as torch's capturable/fused AdamW keep it).
        new = {}
        for key in self._required_slot_keys(group):
            if state.get(key) is None:
                new[key] = (torch.zeros((), dtype=torch.float32, device=p.device) if key == "step"
                            else torch.zeros_like(p, memory_format=torch.preserve_format))
        return new

    def _update_bucket(self, bi, slots, params, accs, group, lr, verdict, grad_scale):
        keys = self._required_slot_keys(group)
        state = dict(zip(keys, self._slot_tensors(bi, slots, keys)))
        beta1, beta2 = (float(beta) for beta in group["betas"])  # tensor betas are read here
        direct_ops.clipped_adamw_step_(params, accs, state["exp_avg"], state["exp_avg_sq"],
                                       state.get("max_exp_avg_sq", []), state["step"],
                                       verdict.norm_on(params[0].device), lr,
                                       beta1, beta2, group["eps"], group["weight_decay"], group["amsgrad"],
                                       group["maximize"], grad_scale, verdict.max_norm, verdict.skip_nonfinite)

    # ------------------------------------------------------------------ checkpoint hooks
    def _pack_param_states(self, states, read_flags):
        """Already torch.optim.AdamW's layout: step, exp_avg, exp_avg_sq (, max_exp_avg_sq)."""

    def _check_loaded_state(self, index, entry, param, check_tensor):
        for key in _MOMENTS:
            if entry.get(key) is not None:
                check_tensor(f"{key} of parameter {index}", entry[key], param)
        step = entry.get("step")
        if step is not None:
            value = step if isinstance(step, numbers.Real) and not isinstance(step, bool) else None
            if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex():
                value = float(step)
            if value is None or not 0 <= value < float("inf"):
                raise ValueError(f"step of parameter {index} must be a non-negative number or 1-element tensor, "
                                 f"got {step!r}")
        elif any(key in entry for key in _MOMENTS):
            raise ValueError(f"state of parameter {index} has moments but no step count")

    def _unpack_loaded_state(self, p, state, like_param):
        for key in _MOMENTS:
            if key in state:
                state[key] = like_param(state[key], p)
        if "step" in state:  # on the parameter's device: the fused update counts there without a host sync
            state["step"] = torch.as_tensor(float(state["step"]), dtype=torch.float32).to(p.device)
