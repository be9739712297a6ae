"""A cycle's verdict: what the fused update kernels of one cycle take (the norm they clip by, as a
device tensor on each device, max_norm, whether a non-finite norm skips), formed on the device
from the global norm by the clip policy and the skip policy."""
import torch
import torch.distributed as dist

from .clip_policy import FixedClip
from .distributed_norm import ranks_communicate


class CycleVerdict:
    __slots__ = ("norms", "max_norm", "skip_nonfinite", "skipped")

    def __init__(self, norm, max_norm, skip_nonfinite, skipped):
        self.norms = {norm.device: norm}
        self.max_norm, self.skip_nonfinite = max_norm, skip_nonfinite
        self.skipped = skipped  # 0-dim bool device tensor: this cycle's update is skipped

    def norm_on(self, device):
        if device not in self.norms:
            self.norms[device] = next(iter(self.norms.values())).to(device)
        return self.norms[device]


def decide(total, max_grad_norm, clip, skip, loss, skip_nonfinite, skipped_steps):
    """The verdict for total (0-dim float64, on skipped_steps' device); a spike that skip
    decides to skip is counted in skipped_steps (a non-finite norm was counted already)."""
    norm, max_norm = (clip if clip is not None else FixedClip(max_grad_norm)).kernel_inputs(total)
    finite = torch.isfinite(total)
    if skip is not None:
        spike = skip.decide(total, loss) & finite
        skipped_steps.add_(spike.to(skipped_steps.dtype))
        norm = torch.where(spike, torch.full_like(norm, float("nan")), norm)  # the kernels skip a NaN norm
        skip_nonfinite = True
    skipped = ~torch.isfinite(norm) if skip_nonfinite else torch.zeros_like(finite)
    return CycleVerdict(norm, max_norm, skip_nonfinite, skipped)


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
