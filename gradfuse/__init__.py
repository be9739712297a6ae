"""gradfuse: fused gradient accumulation + global-norm clipping + SGD / AdamW for PyTorch."""
from . import ops
from ._native import cuda_compiled
from .adamw import FusedAccumAdamW
from .sgd import FusedAccumSGD

__all__ = ["FusedAccumSGD", "FusedAccumAdamW", "ops", "cuda_compiled"]
__version__ = "0.1.0"
