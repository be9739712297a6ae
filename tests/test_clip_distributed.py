"""gradfuse.clip_grad_norm_ on FSDP2 (DTensor) gradients in 2 real gloo processes: the returned norm
is the global one (every element of the full gradients counted once) and the clipped shards are
the single-process clipped gradients, for the 2- and inf-norm."""
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from spawn_ranks import spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

RANKS = 2


def make_model():
    torch.manual_seed(4321)
    # 13 and 7 rows: shards of unequal size on 2 ranks (FSDP2 pads the last one).
    return nn.Sequential(nn.Linear(6, 13), nn.Tanh(), nn.Linear(13, 7)).double()


def batch():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randn(5, 7, generator=gen, dtype=torch.float64)


def full_model_reference(max_norm, norm_type):
    """Single process, whole model, same batch: torch's norm and clipped gradients."""
    model = make_model()
    x, y = batch()
    nn.functional.mse_loss(model(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    return float(norm), [p.grad.clone() for p in model.parameters()]


def fsdp2_clip(rank, max_norm, norm_type):
    import gradfuse
    from torch.distributed.fsdp import fully_shard

    expected_norm, expected_grads = full_model_reference(max_norm, norm_type)
    model = make_model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    x, y = batch()  # every rank the same rows: the reduced gradient is the single-process one
    nn.functional.mse_loss(model(x), y).backward()
    norm = gradfuse.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    if type(norm) is not torch.Tensor or norm.dtype != torch.float64 or norm.dim() != 0:
        raise AssertionError(f"rank {rank}: expected a plain 0-dim float64 tensor, got {type(norm)} {norm}")
    if not math.isclose(float(norm), expected_norm, rel_tol=1e-12):
        raise AssertionError(f"rank {rank}: global norm {float(norm)!r} != single-process {expected_norm!r}")
    local_only = gradfuse.get_total_norm([p.grad.to_local() for p in model.parameters()], norm_type)
    if math.isclose(float(local_only), expected_norm, rel_tol=1e-6):
        raise AssertionError(f"rank {rank}: the local shards alone already give the full norm; the test shows nothing")
    for i, p in enumerate(model.parameters()):
        full = p.grad.full_tensor()
        err = (full - expected_grads[i]).abs().max().item()
        if not err <= 1e-14:
            raise AssertionError(f"rank {rank}: clipped gradient {i} is {err:.3e} off the single-process one")


def entry(rank, store, max_norm):
    torch.set_num_threads(1)  # two ranks share two cores
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=RANKS)
    try:
        for norm_type in (2.0, math.inf):  # one process group for both: spawning dominates the run time
            fsdp2_clip(rank, max_norm, norm_type)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_clip_gives_the_global_norm():
    # max_norm below the norm, so the clipped shards test the global factor too
    spawn_ranks(entry, RANKS, 1e-3)
