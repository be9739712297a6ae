"""Spike skipping: the decision rule of ai2-olmo-core's SkipStepOptimizer.get_step_factor (3.0.0),
on the device. A cycle is skipped when its loss or its gradient norm is more than sigma standard
deviations (unbiased) above the mean of the last `window` values before it; no decision until
max(2, window // 2) values (the current one included) have been seen. The loss is optional (the
mean of the cycle's micro-batch losses given to step(loss=...)); without it the norm decides alone.
A non-finite value is never recorded (its cycle is skipped for the non-finite norm anyway)."""
import torch

from .device_state import DeviceState


class SpikeSkip(DeviceState):
    name = "spike_skip"

    def __init__(self, window=128, sigma=6.0):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"SpikeSkip: window must be an int >= 1, got {window!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not float(sigma) >= 0.0:
            raise ValueError(f"SpikeSkip: sigma must be a number >= 0, got {sigma!r}")
        self.window, self.sigma = window, float(sigma)
        self.state = {}

    def __repr__(self):
        return f"SpikeSkip(window={self.window}, sigma={self.sigma})"

    def fresh_state(self, device):
        return {"count": torch.zeros((), dtype=torch.int64, device=device),  # values recorded
                "norms": torch.zeros(self.window, dtype=torch.float64, device=device),  # a ring of the last ones
                "losses": torch.zeros(self.window, dtype=torch.float64, device=device),
                "loss_count": torch.zeros((), dtype=torch.int64, device=device)}

    def _spike(self, ring, count, value):
        """The spike decision for one series; value is then recorded in ring and count, in place (a
        captured CUDA graph replays into the same tensors)."""
        seen = count.clamp(max=self.window)
        valid = torch.arange(self.window, device=ring.device) < seen
        previous = seen.to(torch.float64)
        mean = torch.where(valid, ring, 0).sum() / previous
        std = (torch.where(valid, ring - mean, 0).pow(2).sum() / (previous - 1)).sqrt()  # unbiased, as torch.std
        decides = count + 1 >= max(2, self.window // 2)
        spike = decides & ~((value - mean) <= self.sigma * std)  # NaN std (one earlier value) skips, as OLMo's does
        finite = torch.isfinite(value)
        slot = (count % self.window).reshape(1)
        ring.index_copy_(0, slot, torch.where(finite, value, ring.index_select(0, slot)[0]).reshape(1))
        count.add_(finite.to(torch.int64))
        return spike

    def decide(self, norm, loss=None):
        """Whether this cycle is skipped (0-dim bool device tensor), recording its norm (and loss)."""
        state = self.state_on(norm.device)
        spike = self._spike(state["norms"], state["count"], norm)
        if loss is not None:
            loss = loss.to(device=norm.device, dtype=torch.float64).reshape(())
            spike = spike | self._spike(state["losses"], state["loss_count"], loss)
        return spike
