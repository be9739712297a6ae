"""A cycle's verdict: what the fused update kernels of one cycle take (the norm they clip by, as a
device tensor on each device, max_norm, whether a non-finite norm skips), formed on the device
from the global norm by the clip policy and the skip policy."""
import torch
import torch.distributed as dist

from .distributed_norm import ranks_communicate


class CycleVerdict:
    __slots__ = ("norms", "max_norm", "skip_nonfinite")

    def __init__(self, norm, max_norm, skip_nonfinite):
        self.norms = {norm.device: norm}
        self.max_norm, self.skip_nonfinite = max_norm, skip_nonfinite

    @property
    def skipped(self):
        """0-dim bool device tensor: whether this cycle's update is skipped. Formed at each read, from
        the norm the kernels took (two tensor ops every step cost more host time than the rest of a
        small model's step; and a replayed CUDA graph rewrites that norm)."""
        norm = next(iter(self.norms.values()))
        return ~torch.isfinite(norm) if self.skip_nonfinite else torch.zeros((), dtype=torch.bool, device=norm.device)

    def norm_on(self, device):
        if device not in self.norms:
            self.norms[device] = next(iter(self.norms.values())).to(device)
        return self.norms[device]


def decide(total, max_grad_norm, clip, skip, loss, skip_nonfinite, skipped_steps):
    """The verdict for total (0-dim float64, on skipped_steps' device); a spike that skip
    decides to skip is counted in skipped_steps (a non-finite norm was counted already)."""
    # max_grad_norm= alone: the kernels form torch's factor min(1, max_norm / (norm + 1e-6)) themselves
    norm, max_norm = clip.kernel_inputs(total) if clip is not None else (total, max_grad_norm)
    if skip is not None:
        spike = skip.decide(total, loss) & torch.isfinite(total)
        skipped_steps.add_(spike.to(skipped_steps.dtype))
        norm = torch.where(spike, torch.full_like(norm, float("nan")), norm)  # the kernels skip a NaN norm
        skip_nonfinite = True
    return CycleVerdict(norm, max_norm, skip_nonfinite)


def cycle_loss(loss_sum, count):
    """The cycle's loss for the skip policy: the mean of its micro-batch losses, averaged over the
    data-parallel ranks (one small all-reduce on the loss's device), or None when none was given."""
    if loss_sum is None:
        return None
    loss = loss_sum / count
    if ranks_communicate():
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        loss = loss / dist.get_world_size()
    return loss
