"""gradfuse: fused gradient accumulation + global-norm clipping + SGD / AdamW for PyTorch."""
from . import ops
from ._native import cuda_compiled
from .adamw import FusedAccumAdamW
from .clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from .per_cycle import PerCycle
from .sgd import FusedAccumSGD
from .spike_skip import SpikeSkip
from .zclip import ZClip

__all__ = ["FusedAccumSGD", "FusedAccumAdamW", "ops", "cuda_compiled", "clip_grad_norm_", "clip_grads_with_norm_",
           "get_total_norm", "PerCycle", "ZClip", "SpikeSkip"]
__version__ = "0.1.0"
