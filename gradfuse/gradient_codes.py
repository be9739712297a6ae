"""What the optimizer may do with a gradient (csrc/tensor_checks.h GradientCode, as the bytes
GradientInspector.gather returns), and the same decision in Python for gradients the native
inspection does not see (DTensor shards, gradients caught in a backward hook)."""
import torch

NONE, ADOPT, COPY, RELAYOUT = b"\x00", b"\x01", b"\x02", b"\x03"


def code_for(grad: torch.Tensor, like: torch.Tensor) -> bytes:
    """RELAYOUT when grad is laid out unlike `like`; COPY when its memory may belong to someone
    else (a view, part of a graph, an offset into a bigger storage); ADOPT otherwise."""
    if grad.numel() > 1 and grad.stride() != like.stride():
        return RELAYOUT
    if grad._is_view() or grad.requires_grad or grad.storage_offset() != 0:
        return COPY
    return ADOPT
