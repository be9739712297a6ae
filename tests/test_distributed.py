"""Multi-process training on gloo (CPU): DDP with and without no_sync, FSDP2 on 1-D and 2-D
(HSDP) meshes in both gradient-sync modes, and manual sharding with process_group, each against
a single-process float64 run of the full model (tests/distributed_workers.py)."""
import pytest
import torch
import torch.distributed as dist

import distributed_workers
from spawn_ranks import spawn_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")




# gloo on CPU always; NCCL on CUDA where a machine has a GPU per rank (skipped otherwise).
BACKENDS = ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    not (dist.is_available() and dist.is_nccl_available() and torch.cuda.device_count() >= 2),
    reason="NCCL runs need two CUDA devices"))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def spawn(ranks, scenario, *args, backend="gloo"):
    """Runs the scenario on `ranks` processes (tests/spawn_ranks.py: a file store, one more run after
    gloo's shutdown SIGABRT)."""
    if backend == "nccl" and torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} CUDA devices")
    spawn_ranks(distributed_workers.entry, ranks, ranks, scenario, args, backend)


@pytest.mark.parametrize("bucket_view", [False, True], ids=["grad_copy", "bucket_view"])
def test_ddp_no_sync_one_all_reduce_per_cycle(backend, bucket_view):
    spawn(2, "ddp_no_sync", True, bucket_view, backend=backend)


@pytest.mark.parametrize("use_no_sync", [True, False], ids=["no_sync", "sync_each"])
@pytest.mark.parametrize("bucket_view", [False, True], ids=["grad_copy", "bucket_view"])
def test_ddp_running_sums_in_grad_under_no_sync(use_no_sync, bucket_view):
    spawn(2, "ddp_no_sync", use_no_sync, bucket_view, False, True)


@pytest.mark.parametrize("use_no_sync", [True, False], ids=["no_sync", "sync_each"])
def test_ddp_flat_buffers_match_single_process(use_no_sync):
    spawn(2, "ddp_no_sync", use_no_sync, False, True)


def test_ddp_flat_buffers_refuse_gradient_as_bucket_view():
    spawn(2, "ddp_flat_bucket_view_refused")


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_cycle_policies_decide_alike_on_every_rank(wrapper):
    spawn(2, "policies_match_single_process", wrapper)


def test_cycle_policies_under_process_group_sharding():
    spawn(2, "policies_under_process_group")


def test_complex_and_gappy_params_refused_under_torch_distributed():
    spawn(2, "strided_param_refused_under_ddp")


def test_fsdp2_flat_buffers_refused():
    spawn(2, "fsdp2_flat_buffers_refused")


@pytest.mark.parametrize("growth_interval,max_grad_norm", [(1000, 0.05), (1000, None), (3, 0.05)],
                         ids=["steady_scale", "steady_scale-no_clip", "scale_grows"])
def test_ddp_no_sync_with_grad_scaler(growth_interval, max_grad_norm):
    spawn(2, "ddp_grad_scaler", growth_interval, max_grad_norm)


def test_ddp_without_no_sync_stays_correct(backend):
    spawn(2, "ddp_no_sync", False, False, backend=backend)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("sync_every_micro_batch", [True, False], ids=["reduce_scatter_each", "sync_last_only"])
def test_fsdp2_matches_single_process(backend, ranks, sync_every_micro_batch):
    spawn(ranks, "fsdp2", (ranks,), sync_every_micro_batch, backend=backend)


def test_fsdp2_adamw_matches_single_process(backend):
    # The FSDP2 recipe of docs/distributed.md uses FusedAccumAdamW: its DTensor moments and device step counts.
    spawn(2, "fsdp2", (2,), False, "adamw", backend=backend)


@pytest.mark.parametrize("sync_every_micro_batch", [True, False], ids=["reduce_scatter_each", "sync_last_only"])
def test_hsdp_2d_mesh_matches_single_process(backend, sync_every_micro_batch):
    spawn(4, "fsdp2", (2, 2), sync_every_micro_batch, backend=backend)


def test_process_group_makes_the_norm_global(backend):
    spawn(2, "manual_sharding", backend=backend)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_mid_cycle_checkpoint_resumes_bit_identically_per_rank(backend, wrapper):
    spawn(2, "resume_mid_cycle", wrapper, backend=backend)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_dcp_get_set_state_dict_resumes_mid_cycle_bit_identically(wrapper):
    spawn(2, "resume_mid_cycle", wrapper, "dcp")
