"""gradfuse: fused gradient accumulation + global-norm clipping + SGD for PyTorch."""
from . import ops
from ._native import cuda_compiled
from .sgd import FusedAccumSGD

__all__ = ["FusedAccumSGD", "ops", "cuda_compiled"]
__version__ = "0.1.0"
