"""How a cycle's global norm becomes the clip factor of its update: the interface of the adaptive
clip policies (zclip.py: ZClip; max_grad_norm= alone is the kernels' own factor, see
cycle_verdict.py). A policy's state is a dict of device tensors, checkpointed with the optimizer."""
import torch

from .device_state import DeviceState

CLIP_EPSILON = 1e-6  # torch.nn.utils.clip_grad_norm_'s constant (also zclip's)


class ClipPolicy(DeviceState):
    def coefficient(self, norm):
        """The clip coefficient in (0, 1] for this norm (0-dim float64 device tensor), no host sync."""
        raise NotImplementedError

    def kernel_inputs(self, norm):
        """(norm, max_norm) for the fused update kernels, which scale by min(1, max_norm / (norm +
        1e-6)) and skip a non-finite norm: the coefficient c is handed over as the norm whose factor
        for max_norm 1 is c (a few ulps of c; exactly 1 where c is 1)."""
        c = self.coefficient(norm)
        equivalent = torch.where(c >= 1.0, torch.zeros_like(norm), c.reciprocal() - CLIP_EPSILON)
        return torch.where(torch.isfinite(norm), equivalent, norm), 1.0
