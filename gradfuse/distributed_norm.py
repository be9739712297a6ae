"""Global norms of sharded gradients: a norm partial ([value, non-finite flag], float64) is
reduced over the process groups that hold different pieces of a tensor, never over replicas,
so every element of the full (logical) gradient is counted exactly once."""
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

try:  # DTensor (FSDP2, tensor parallel): placements say which mesh dimensions shard a tensor
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard
except ImportError:  # pragma: no cover - torch without torch.distributed.tensor
    DTensor = None


def is_dtensor(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own piece of a DTensor (the tensor itself otherwise); read it anew at every use,
    since FSDP2 may rebind a parameter's local shard after the optimizer was built."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def shard_groups(tensor: torch.Tensor, what: str = "tensor") -> Tuple[dist.ProcessGroup, ...]:
    """Process groups of the mesh dimensions over which a DTensor is sharded (empty for a plain
    tensor or a fully replicated DTensor): its norm partial is summed over exactly these."""
    if not is_dtensor(tensor):
        return ()
    groups = []
    for dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Shard):
            groups.append(tensor.device_mesh.get_group(dim))
        elif isinstance(placement, Partial):
            raise ValueError(f"{what} is a DTensor with a Partial placement on mesh dimension {dim}: its values "
                             f"are pending a reduction, so no norm of it is defined; redistribute it to Shard or "
                             f"Replicate first")
        elif not isinstance(placement, Replicate):
            raise ValueError(f"{what} is a DTensor with placement {placement!r} on mesh dimension {dim}, which "
                             f"gradfuse does not know how to count in a norm")
    return tuple(groups)


def all_reduce_norm_state_(state: torch.Tensor, groups: Sequence[Optional[dist.ProcessGroup]],
                           norm_type: float) -> torch.Tensor:
    """Reduces a [value, flag] norm state in place over each group in turn: a sum of squares
    (and of flags) for the 2-norm, a maximum for the inf-norm. One small collective per group,
    on the state's device (no host synchronisation with NCCL)."""
    op = dist.ReduceOp.MAX if norm_type == float("inf") else dist.ReduceOp.SUM
    for group in groups:
        dist.all_reduce(state, op=op, group=group)
    return state


def ranks_communicate() -> bool:
    """More than one process in the default group: the ranks' gradients are communicated."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
