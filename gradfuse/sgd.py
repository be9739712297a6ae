"""FusedAccumSGD: gradient accumulation + global-norm clipping + torch.optim.SGD in fused
native passes, with the norm, clip factor and skip decision kept on the device."""
import torch

from . import direct_ops
from . import hyperparameters as hp
from .core import FusedAccumOptimizer


class FusedAccumSGD(FusedAccumOptimizer):
    """torch.optim.SGD with built-in gradient accumulation and global-norm clipping.

    Call step() once per micro-batch (and do not divide the loss by K: A below is already the
    mean): micro-steps 1..K-1 only accumulate A = sum(grad)/K;
    micro-step K computes the norm_type norm of A over all parameters, skips the update when
    it is not finite (skip_nonfinite), scales A by min(1, max_grad_norm / (norm + 1e-6)) and
    applies SGD (weight decay, momentum, dampening, nesterov, maximize) in one pass.

    Running sums of tensors of 64K elements and more stay as their .grad between micro-batches
    (autograd adds into them in place: torch's own loop's memory); sum_in_grad=False keeps every
    micro-batch's gradient apart from the sums (gradfuse/resident_store.py).

    flat_buffers=True keeps the parameters, their gradients and the per-element state as views of one
    flat buffer per (group, device, dtype): autograd accumulates in place and every pass is one call,
    however many tensors (for models of many small tensors; see gradfuse/flat_store.py).
    """

    _RULE = "SGD"
    _GROUP_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    _STATE_KEYS = frozenset({"momentum_buffer"})
    _ELEMENT_KEYS = ("momentum_buffer",)
    _SLOT_KEYS = ("momentum_buffer", "momentum_initialized")
    _LEGACY_GROUP_DEFAULTS = {"maximize": False, "nesterov": False}

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, accumulation_steps=1, max_grad_norm=None, norm_type=2.0, skip_nonfinite=True,
                 error_if_nonfinite=False, accum_dtype=None, process_group=None, accumulate_in_backward=False,
                 flat_buffers=False, clip=None, skip=None, track_param_norms=False, sum_in_grad=True):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
                         norm_type=norm_type, skip_nonfinite=skip_nonfinite, error_if_nonfinite=error_if_nonfinite,
                         accum_dtype=accum_dtype, process_group=process_group,
                         accumulate_in_backward=accumulate_in_backward, flat_buffers=flat_buffers, clip=clip,
                         skip=skip, track_param_norms=track_param_norms, sum_in_grad=sum_in_grad)

    def _check_group(self, group, check_tensor_lr=True):
        hp.check_sgd_group(group, check_tensor_lr)

    def _required_slot_keys(self, group):
        return self._SLOT_KEYS if group["momentum"] != 0 else ()  # torch.optim.SGD keeps no state then

    def _new_param_state(self, p, group, state):
        # Zero-filled, flagged unwritten: torch.optim.SGD's first update stores d itself. A buffer
        # set the torch way (opt.state[p]["momentum_buffer"] = t) holds a written value.
        if state.get("momentum_buffer") is not None:
            return {} if "momentum_initialized" in state else {
                "momentum_initialized": torch.ones((), dtype=torch.bool, device=p.device)}
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format),
                "momentum_initialized": torch.zeros((), dtype=torch.bool, device=p.device)}

    def _update_bucket(self, bi, slots, params, accs, group, lr, verdict, grad_scale):
        buffers, flags = self._slot_tensors(bi, slots, self._SLOT_KEYS) if group["momentum"] != 0 else ([], [])
        direct_ops.clipped_sgd_step_(params, accs, buffers, flags, verdict.norm_on(params[0].device), lr,
                                     group["weight_decay"], group["momentum"], group["dampening"], group["nesterov"],
                                     group["maximize"], grad_scale, verdict.max_norm, verdict.skip_nonfinite)

    # ------------------------------------------------------------------ checkpoint hooks
    def _pack_param_states(self, states, read_flags):
        """torch.optim.SGD's layout: no written-once flags, and no buffer never written."""
        flags = {index: state.pop("momentum_initialized") for index, state in states.items()
                 if "momentum_initialized" in state}
        written = read_flags(flags)
        for index, state in states.items():
            if not written.get(index, True):
                state.pop("momentum_buffer", None)

    def _check_loaded_state(self, index, entry, param, check_tensor):
        if entry.get("momentum_buffer") is not None:
            check_tensor(f"momentum_buffer of parameter {index}", entry["momentum_buffer"], param)

    def _unpack_loaded_state(self, p, state, like_param):
        if "momentum_buffer" in state:
            state["momentum_buffer"] = like_param(state["momentum_buffer"], p)
            state["momentum_initialized"] = torch.ones((), dtype=torch.bool, device=p.device)
