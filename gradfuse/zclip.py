"""ZClip (arXiv 2504.02507; the `zclip` package 1.0.0): adaptive clipping by the z-score of the
gradient norm against an EMA of its mean and variance, after a warm-up. The package's arithmetic,
defaults and order of updates, kept in float64 device tensors: no host sync, CUDA-graph capturable.
Used by the optimizers (clip=ZClip(...), once per cycle on the norm of the cycle's mean gradient)
and standalone (ZClip(...).clip_(parameters), in place of zclip's step(model))."""
import torch

from . import clip as standalone_clip
from . import hyperparameters as hp
from .clip_policy import ClipPolicy, CLIP_EPSILON

_MODES = ("zscore", "percentile")
_OPTIONS = ("adaptive_scaling", "mean")


def _number(name, value, low=None, low_open=False):
    value = hp.real_number(f"ZClip: {name}", value)
    if value != value or (low is not None and (value < low or (low_open and value == low))):
        raise ValueError(f"ZClip: invalid {name} value: {value}")
    return value


class ZClip(ClipPolicy):
    """Same arguments and defaults as zclip.ZClip. max_grad_norm caps every threshold (and clips
    alone, torch-style, during the warm-up); None leaves the adaptive threshold uncapped."""
    name = "zclip"

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25, mode="zscore",
                 clip_option="adaptive_scaling", clip_factor=1.0, skip_update_on_spike=False):
        self.alpha = _number("alpha", alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"ZClip: alpha must be in [0, 1], got {alpha}")
        self.z_thresh = _number("z_thresh", z_thresh, 0.0, low_open=True)
        self.max_grad_norm = None if max_grad_norm is None else _number("max_grad_norm", max_grad_norm, 0.0, True)
        self.eps = _number("eps", eps, 0.0)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"ZClip: warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        if not isinstance(mode, str) or mode.lower() not in _MODES:
            raise ValueError(f"ZClip: mode must be either 'zscore' or 'percentile', got {mode!r}")
        self.mode = mode.lower()
        if self.mode == "zscore" and clip_option not in _OPTIONS:
            raise ValueError(f"ZClip: for zscore mode, clip_option must be either 'mean' or 'adaptive_scaling', "
                             f"got {clip_option!r}")
        self.clip_option = clip_option if self.mode == "zscore" else None  # ignored in percentile mode, as in zclip
        self.clip_factor = _number("clip_factor", clip_factor, 0.0, low_open=True)
        if not isinstance(skip_update_on_spike, bool):
            raise TypeError(f"ZClip: skip_update_on_spike must be a bool, got {skip_update_on_spike!r}")
        self.skip_update_on_spike = skip_update_on_spike
        self.state = {}

    def __repr__(self):
        return (f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, max_grad_norm={self.max_grad_norm}, "
                f"eps={self.eps}, warmup_steps={self.warmup_steps}, mode={self.mode!r}, "
                f"clip_option={self.clip_option!r}, clip_factor={self.clip_factor}, "
                f"skip_update_on_spike={self.skip_update_on_spike})")

    def fresh_state(self, device):
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return {"count": torch.zeros((), dtype=torch.int64, device=device),
                "buffer": torch.zeros(max(self.warmup_steps, 1), dtype=torch.float64, device=device),
                "mean": zero.clone(), "var": zero.clone()}

    def coefficient(self, norm):
        """The clip coefficient of this norm (0-dim float64, on the norm's device), updating the EMA
        state as zclip's step() does; a non-finite norm (a cycle skipped anyway) leaves it unchanged."""
        state = self.state_on(norm.device)
        count, buffer, mean, var = state["count"], state["buffer"], state["mean"], state["var"]
        finite = torch.isfinite(norm)
        warm_length = buffer.numel()  # zclip initializes once len(buffer) >= warmup_steps, at least one norm in
        warming = count < warm_length
        # Warm-up: collect the norm; clip torch-style to max_grad_norm.
        slot = count.clamp(max=warm_length - 1).reshape(1)
        collected = buffer.index_copy(0, slot, torch.where(warming & finite, norm, buffer[slot[0]]).reshape(1))
        initializing = warming & finite & (count + 1 >= warm_length)
        first_mean = collected.sum() / warm_length
        first_var = (collected - first_mean).pow(2).sum() / warm_length
        warm_coefficient = (torch.clamp(self.max_grad_norm / (norm + CLIP_EPSILON), max=1.0)
                            if self.max_grad_norm is not None else torch.ones_like(norm))
        # After the warm-up: the threshold from the EMA before this norm.
        std = var.sqrt()
        if self.mode == "percentile":
            threshold = mean + self.z_thresh * std
            spike = norm > threshold
        else:
            z = (norm - mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                eta = z / self.z_thresh  # a greater penalty on larger outliers
                threshold = (mean + (self.z_thresh * std) / eta) * self.clip_factor
            else:
                threshold = mean
        adaptive = torch.where(spike, threshold, norm)
        effective = torch.clamp(adaptive, max=self.max_grad_norm) if self.max_grad_norm is not None else adaptive
        ema_coefficient = torch.where(norm > effective, effective / (norm + CLIP_EPSILON), torch.ones_like(norm))
        new_mean = self.alpha * mean + (1 - self.alpha) * adaptive
        new_var = self.alpha * var + (1 - self.alpha) * (adaptive - new_mean).pow(2)
        updates = ~warming & finite
        if self.skip_update_on_spike:  # a spike leaves the statistics as they were
            updates = updates & ~spike
        coefficient = torch.where(warming, warm_coefficient, ema_coefficient)
        # In place, after every read of the old values: a captured CUDA graph replays into the same tensors.
        buffer.copy_(torch.where(initializing, torch.zeros_like(collected), collected))
        mean.copy_(torch.where(initializing, first_mean, torch.where(updates, new_mean, mean)))
        var.copy_(torch.where(initializing, first_var, torch.where(updates, new_var, var)))
        count.add_(finite.to(torch.int64))
        return coefficient

    @torch.no_grad()
    def clip_(self, parameters):
        """zclip's step(model) for any optimizer: the float64 global norm of the parameters'
        gradients (DTensor ones made global), the coefficient on the device, one fused scaling pass.
        Returns the total norm (float64, before clipping) as a device tensor."""
        return standalone_clip.clip_with_policy_(parameters, self.coefficient)
