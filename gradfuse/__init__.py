"""gradfuse: fused gradient accumulation + global-norm clipping + SGD / AdamW for PyTorch."""
from . import ops
from ._native import cuda_compiled
from .adamw import FusedAccumAdamW
from .clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from .per_cycle import PerCycle
from .sgd import FusedAccumSGD

__all__ = ["FusedAccumSGD", "FusedAccumAdamW", "ops", "cuda_compiled", "clip_grad_norm_", "clip_grads_with_norm_",
           "get_total_norm", "PerCycle"]
__version__ = "0.1.0"
