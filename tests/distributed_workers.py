"""Process bodies of the multi-process tests (gloo, CPU): each trains a small float64 model with
FusedAccumSGD under a real torch.distributed wrapper and checks it against a single-process run
of the full model on the concatenated batch, inside every rank. Failures raise in the rank."""

import os

import torch
import torch.distributed as dist
from torch import nn

from gradfuse import FusedAccumAdamW, FusedAccumSGD, resident_store

ROWS_PER_RANK = 3
CYCLES = 3
K = 4
HYPER = dict(lr=0.2, momentum=0.9, weight_decay=0.01, accumulation_steps=K, max_grad_norm=0.05)
# Each rule with its hyperparameters: the FSDP2 scenario runs both.
RULES = {"sgd": (FusedAccumSGD, HYPER),
         "adamw": (FusedAccumAdamW, dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.01, accumulation_steps=K,
                                         max_grad_norm=0.05))}


DEVICE = torch.device("cpu")  # set per process by entry(): cpu on gloo, the rank's GPU on nccl


def make_model():
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(5, 13), nn.Tanh(), nn.Linear(13, 3)).double().to(DEVICE)


def micro_batches():
    """The full (all ranks') micro-batches of every cycle, the same in every process."""
    gen = torch.Generator().manual_seed(99)
    rows = ROWS_PER_RANK * dist.get_world_size()
    return [(torch.randn(rows, 5, generator=gen, dtype=torch.float64).to(DEVICE),
             torch.randn(rows, 3, generator=gen, dtype=torch.float64).to(DEVICE)) for _ in range(CYCLES * K)]


def rank_rows(batch, rank, ranks):
    x, y = batch
    per = x.shape[0] // ranks
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def reference_params(batches, rule="sgd"):
    """The independent reference of every scenario (no gradfuse, so no hand-back path shared with
    the run under test): torch's optimizer on the full model and the concatenated micro-batches."""
    return torch_reference(batches, RULES[rule][1]["max_grad_norm"], rule)


def check_close(actual, expected, what, tol=1e-10):
    for i, (a, e) in enumerate(zip(actual, expected)):
        err = (a - e).abs().max().item() if a.numel() else 0.0
        if not err <= tol:
            raise AssertionError(f"{what}: parameter {i} is {err:.3e} off the single-process reference")


def check_same_on_every_rank(tensors, what):
    """Bitwise equality of the ranks' tensors (all_gather, then compare the raw bytes)."""
    for i, t in enumerate(tensors):
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, t.contiguous())
        for r, other in enumerate(gathered):
            if not torch.equal(other.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)):
                raise AssertionError(f"{what}: parameter {i} differs between rank {dist.get_rank()} and rank {r}")


def ddp_no_sync(rank, ranks, use_no_sync, bucket_view, flat_buffers=False, every_sum_in_grad=False):
    """every_sum_in_grad: every tensor may keep its running sum in .grad (resident_store.py); between
    micro-batches under no_sync() they must (DDP leaves .grad alone there), and be kept apart when DDP
    communicates every micro-batch (it changes .grad after autograd)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    if every_sum_in_grad:
        resident_store.RESIDENT_MIN_ELEMENTS = 0

    batches = micro_batches()
    expected, expected_norms = reference_params(batches)
    model = DDP(make_model(), gradient_as_bucket_view=bucket_view)
    reductions = []

    def counting_hook(state, bucket):  # DDP's own all-reduce, counted
        reductions.append(bucket.index())
        return allreduce_hook(state, bucket)
    model.register_comm_hook(None, counting_hook)
    opt = FusedAccumSGD(model.parameters(), **HYPER, flat_buffers=flat_buffers)
    norms = []
    for batch in batches:
        x, y = rank_rows(batch, rank, ranks)
        if use_no_sync and not opt.sync_gradients:
            with model.no_sync():
                nn.functional.mse_loss(model(x), y).backward()
        else:
            nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if opt.micro_step == 0:
            norms.append(float(opt.last_grad_norm))
        elif every_sum_in_grad and not opt.sync_gradients and opt._store.sums_in_grad() != use_no_sync:
            raise AssertionError(f"micro-step {opt.micro_step}: running sums in .grad "
                                 f"{opt._store.sums_in_grad()}, expected {use_no_sync}")
    params = [p.detach() for p in model.parameters()]
    check_close(params, expected, "DDP")
    check_same_on_every_rank(params, "DDP")
    if max(abs(a - b) for a, b in zip(norms, expected_norms)) > 1e-12:
        raise AssertionError(f"DDP norms {norms} != single-process {expected_norms}")
    buckets = len(set(reductions))
    expected_reductions = CYCLES * buckets * (1 if use_no_sync else K)
    if len(reductions) != expected_reductions:
        raise AssertionError(f"{len(reductions)} bucket all-reduces for {CYCLES} cycles of {buckets} buckets; "
                             f"expected {expected_reductions}")


def ddp_flat_bucket_view_refused(rank, ranks):
    """DDP's gradient_as_bucket_view rebinds .grad to its buckets: flat_buffers=True must say so."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model(), gradient_as_bucket_view=True)
    opt = FusedAccumSGD(model.parameters(), **HYPER, flat_buffers=True)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        for batch in micro_batches()[:K]:  # refused at the cycle's end, before the update
            x, y = rank_rows(batch, rank, ranks)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    except RuntimeError as error:
        if "not its view of the flat gradient buffer" not in str(error):
            raise
    else:
        raise AssertionError("flat_buffers=True under gradient_as_bucket_view=True was not refused")
    if not all(torch.equal(p, b) for p, b in zip(model.parameters(), before)):
        raise AssertionError("the refused step changed parameters")


def policy_micro_step(model, opt, x, y, zero_grad):
    """One micro-batch, its loss handed to the skip policy; True when it ended a cycle."""
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step(loss=loss)
    zero_grad()
    return opt.micro_step == 0


def policies_under_process_group(rank, ranks):
    """ZeRO-style sharding with process_group=: each rank updates its own parameters with clip=ZClip,
    skip=SpikeSkip and track_param_norms, and reaches the single-process decisions, parameters and
    per-parameter norms (the global norm summed over the ranks, each parameter's norm its own)."""
    from gradfuse import SpikeSkip, ZClip

    k, cycles = 2, 20
    gen = torch.Generator().manual_seed(11)
    batches = [(torch.randn(6, 5, generator=gen, dtype=torch.float64),
                torch.randn(6, 3, generator=gen, dtype=torch.float64) * (40.0 if t % 11 == 10 else 1.0))
               for t in range(cycles * k)]

    def make_opt(params, **kw):
        return FusedAccumSGD(params, lr=0.1, momentum=0.9, accumulation_steps=k, clip=ZClip(warmup_steps=3),
                             skip=SpikeSkip(window=6, sigma=2.0), track_param_norms=True, **kw)

    def train(model, opt, params, share):
        decisions, norms = [], []
        for x, y in batches:
            if policy_micro_step(model, opt, x, y, model.zero_grad):
                decisions.append(opt.last_step_skipped.clone())
                norms.append(opt.last_param_norms.clone())
                share(params)
        return torch.stack(decisions), norms

    single = make_model()
    expected, expected_norms = train(single, make_opt(single.parameters()), list(single.parameters()), lambda _: None)
    model = make_model()
    params = list(model.parameters())
    owned = [i for i in range(len(params)) if i % ranks == rank]

    def share(all_params):  # each owner sends its updated parameters, as ZeRO does
        for i, p in enumerate(all_params):
            dist.broadcast(p.data, src=i % ranks)
    decisions, norms = train(model, make_opt([params[i] for i in owned], process_group=dist.group.WORLD), params,
                             share)
    if not torch.equal(decisions, expected) or not bool(expected.any()):
        raise AssertionError(f"process_group: decisions {decisions.tolist()} != single-process {expected.tolist()}")
    check_close([p.detach() for p in params], [p.detach() for p in single.parameters()], "process_group policies")
    for cycle, (got, want) in enumerate(zip(norms, expected_norms)):
        check_close([got], [want[owned]], f"process_group per-parameter norms, cycle {cycle}", tol=1e-12)


def strided_param_refused_under_ddp(rank, ranks):
    """Under torch.distributed the running sums go back as .grad, which a complex or gappy parameter's
    kernel view cannot be: refused when the optimizer is built, before anything changes."""
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    params = [base[:, ::2].requires_grad_(), torch.randn(3, dtype=torch.complex64).requires_grad_()]
    before = [p.detach().clone() for p in params]
    for params_given in (params[:1], params[1:]):
        try:
            opt = FusedAccumSGD(params_given, lr=0.1, accumulation_steps=2)
            for p in params_given:
                p.grad = torch.ones_like(p)
            opt.step()
        except ValueError as error:
            if "is complex or not dense in memory; under torch.distributed" not in str(error):
                raise
        else:
            raise AssertionError("a gappy or complex parameter under torch.distributed was not refused")
    if not all(torch.equal(p, b) for p, b in zip(params, before)):
        raise AssertionError("the refused step changed parameters")


def fsdp2_flat_buffers_refused(rank, ranks):
    """FSDP2 owns its DTensor parameters' storage: flat_buffers=True must refuse them at construction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model, mesh=init_device_mesh(DEVICE.type, (ranks,)))
    before = [p.to_local().detach().clone() for p in model.parameters()]
    try:
        FusedAccumSGD(model.parameters(), **HYPER, flat_buffers=True)
    except ValueError as error:
        if "does not support DTensor (FSDP2)" not in str(error):
            raise
    else:
        raise AssertionError("flat_buffers=True over FSDP2 parameters was not refused")
    if not all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before)):
        raise AssertionError("the refused construction changed parameters")


def fsdp2(rank, ranks, mesh_shape, sync_every_micro_batch, rule="sgd"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    batches = micro_batches()
    expected, expected_norms = reference_params(batches, rule)
    mesh = init_device_mesh(DEVICE.type, mesh_shape, mesh_dim_names=("replicate", "shard")[-len(mesh_shape):])
    model = make_model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    cls, hyper = RULES[rule]
    opt = cls(model.parameters(), **hyper)
    norms, torch_norms = [], []
    for batch in batches:
        x, y = rank_rows(batch, rank, ranks)
        model.set_requires_gradient_sync(sync_every_micro_batch or opt.sync_gradients)
        nn.functional.mse_loss(model(x), y).backward()
        if opt.sync_gradients:  # torch's clip on the same sharded gradients, for comparison
            total = nn.utils.get_total_norm([p.grad for p in model.parameters()], 2.0)
            total = total.full_tensor() if hasattr(total, "full_tensor") else total
            torch_norms.append(float(total) / (1 if sync_every_micro_batch else K))
        opt.step()
        opt.zero_grad()
        if opt.micro_step == 0:
            norms.append(float(opt.last_grad_norm))
    full = [p.full_tensor().detach() for p in model.parameters()]
    check_close(full, expected, f"FSDP2 {rule} mesh {mesh_shape}")
    if max(abs(a - b) for a, b in zip(norms, expected_norms)) > 1e-12:
        raise AssertionError(f"FSDP2 norms {norms} != single-process {expected_norms}")
    if not sync_every_micro_batch and max(abs(a - b) for a, b in zip(norms, torch_norms)) > 1e-12:
        raise AssertionError(f"FSDP2 norms {norms} != torch's get_total_norm of the same shards {torch_norms}")


def manual_sharding(rank, ranks):
    """ZeRO-style: every rank sees the full gradients but updates only its own parameters;
    process_group makes the clipping norm global."""
    batches = micro_batches()
    expected, expected_norms = reference_params(batches)
    model = make_model()
    params = list(model.parameters())
    owned = [i for i in range(len(params)) if i % ranks == rank]
    opt = FusedAccumSGD([params[i] for i in owned], process_group=dist.group.WORLD, **HYPER)
    norms = []
    for x, y in batches:
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        model.zero_grad()
        if opt.micro_step == 0:
            norms.append(float(opt.last_grad_norm))
            for i, p in enumerate(params):  # each owner shares its updated parameters, as ZeRO does
                dist.broadcast(p.data, src=i % ranks)
    check_close([params[i].detach() for i in owned], [expected[i] for i in owned], "process_group sharding")
    if max(abs(a - b) for a, b in zip(norms, expected_norms)) > 1e-12:
        raise AssertionError(f"sharded norms {norms} != full-model norms {expected_norms}")


def torch_reference(batches, max_grad_norm, rule="sgd"):
    """Independent of gradfuse and of the process group: torch.optim.SGD / AdamW on the full float64
    model, each cycle's micro-batch gradients summed by hand and divided by K, clip_grad_norm_ (or
    only the norm, with max_grad_norm None). Returns the parameters and each cycle's norm."""
    model = make_model()
    params = list(model.parameters())
    hyper = {k: v for k, v in RULES[rule][1].items() if k not in ("accumulation_steps", "max_grad_norm")}
    opt = (torch.optim.SGD if rule == "sgd" else torch.optim.AdamW)(params, **hyper)
    norms, sums = [], None
    for t, (x, y) in enumerate(batches):
        grads = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)
        sums = list(grads) if sums is None else [a + g for a, g in zip(sums, grads)]
        if (t + 1) % K == 0:
            for p, total in zip(params, sums):
                p.grad = total / K
            limit = float("inf") if max_grad_norm is None else max_grad_norm
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, limit)))
            opt.step()
            opt.zero_grad()
            sums = None
    return [p.detach().clone() for p in params], norms


def ddp_grad_scaler(rank, ranks, growth_interval, max_grad_norm=HYPER["max_grad_norm"]):
    """DDP + no_sync + torch.amp.GradScaler: the handed-back sum goes back scaled; a cycle whose
    scale grew between its last two micro-batches is skipped (the two parts carry different scales).
    The scale starts at 1536 (not a power of two, so multiplying by it and by its reciprocal can't
    round alike); without growth, parameters and every cycle's norm are checked against
    torch_reference (no gradfuse, no process group), also with clipping off."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = make_model().float()
    wrapped = DDP(model)
    opt = FusedAccumSGD(wrapped.parameters(), **dict(HYPER, max_grad_norm=max_grad_norm))
    scaler = torch.amp.GradScaler("cpu", init_scale=1536.0, growth_interval=growth_interval)
    scales, grown_at_boundary, norms = [], 0, []
    for batch in micro_batches():
        x, y = (t.float() for t in rank_rows(batch, rank, ranks))
        last = opt.sync_gradients
        if not last:
            with wrapped.no_sync():
                scaler.scale(nn.functional.mse_loss(wrapped(x), y)).backward()
        else:
            scaler.scale(nn.functional.mse_loss(wrapped(x), y)).backward()
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if last:
            norms.append(float(opt.last_grad_norm))
            if scales and scales[-1] != scale_before:  # K-1 and K ran at different scales
                grown_at_boundary += 1
        scales.append(scale_before)
    params, skipped = [p.detach() for p in wrapped.parameters()], int(opt.skipped_steps)
    check_same_on_every_rank(params, "DDP + GradScaler")
    if skipped != grown_at_boundary:
        raise AssertionError(f"{skipped} cycles skipped; the scale grew inside {grown_at_boundary} cycles' last "
                             f"micro-batch")
    if growth_interval < K and grown_at_boundary == 0:
        raise AssertionError("the scale never grew inside a cycle: the case under test did not happen")
    if grown_at_boundary == 0:
        expected, expected_norms = torch_reference(micro_batches(), max_grad_norm)
        check_close([p.double() for p in params], expected, "DDP + GradScaler", tol=1e-5)
        for cycle, (got, want) in enumerate(zip(norms, expected_norms)):
            if not abs(got - want) <= 1e-5 * want:
                raise AssertionError(f"DDP + GradScaler: cycle {cycle}'s last_grad_norm {got} != torch's {want}")


def resume_mid_cycle(rank, ranks, wrapper, via="state_dict"):
    """A per-rank checkpoint after micro-step K-1 (accumulators handed back as .grad) resumes
    bit-identically under DDP + no_sync, or FSDP2 (sharded accumulators); via "dcp", through
    torch.distributed.checkpoint's get_state_dict / set_state_dict (fully qualified names, only
    'state' and 'param_groups' kept, DTensor state under FSDP2)."""
    batches = micro_batches()

    def build():
        model = make_model()
        if wrapper == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            return model, DDP(model)
        from torch.distributed.fsdp import fully_shard
        return model, fully_shard(model)

    def train(model, wrapped, opt, chunk):
        for batch in chunk:
            x, y = rank_rows(batch, rank, ranks)
            if wrapper == "ddp" and not opt.sync_gradients:
                with wrapped.no_sync():
                    nn.functional.mse_loss(wrapped(x), y).backward()
            else:  # FSDP2 reduce-scatters every micro-batch here: without gradient sync, the pending
                # micro-batches would live in FSDP2's unsharded gradients, which no optimizer checkpoint holds
                nn.functional.mse_loss(wrapped(x), y).backward()
            opt.step()
            opt.zero_grad()

    model, wrapped = build()
    opt = FusedAccumSGD(wrapped.parameters(), **HYPER)
    train(model, wrapped, opt, batches)
    straight = [p.detach().clone() for p in wrapped.parameters()]
    model, wrapped = build()
    opt = FusedAccumSGD(wrapped.parameters(), **HYPER)
    cut = K + K - 1
    train(model, wrapped, opt, batches[:cut])
    if via == "dcp":
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_sd, optim_sd = get_state_dict(wrapped, opt)
        if set(optim_sd) != {"state", "param_groups"}:
            raise AssertionError(f"DCP's optimizer state dict has keys {sorted(optim_sd)}")
        model, wrapped = build()
        opt = FusedAccumSGD(wrapped.parameters(), **HYPER)
        set_state_dict(wrapped, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
        if opt.micro_step != K - 1:
            raise AssertionError(f"DCP resume: micro_step {opt.micro_step}, expected {K - 1}")
    else:
        saved = {"model": {k: v.clone() for k, v in wrapped.state_dict().items()}, "opt": opt.state_dict()}
        model, wrapped = build()
        wrapped.load_state_dict(saved["model"])
        opt = FusedAccumSGD(wrapped.parameters(), **HYPER)
        opt.load_state_dict(saved["opt"])
    train(model, wrapped, opt, batches[cut:])
    for i, (a, b) in enumerate(zip(wrapped.parameters(), straight)):
        a, b = (t.to_local() if hasattr(t, "to_local") else t for t in (a.detach(), b))
        if not torch.equal(a, b):
            raise AssertionError(f"{wrapper}: parameter {i} after a mid-cycle resume differs from the straight run")


def entry(rank, store, ranks, scenario, args, backend="gloo"):
    """torch.multiprocessing.spawn target: joins the process group (through the file store
    `store`, a file:// address), runs one scenario."""
    global DEVICE
    torch.set_num_threads(1)  # several ranks share two cores
    if "GRADFUSE_TEST_RESIDENT_MIN_ELEMENTS" in os.environ:  # as tests/conftest.py does in the parent
        resident_store.RESIDENT_MIN_ELEMENTS = int(os.environ["GRADFUSE_TEST_RESIDENT_MIN_ELEMENTS"])
    if backend == "nccl":
        torch.cuda.set_device(rank)
        DEVICE = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=store, rank=rank, world_size=ranks)
    try:
        globals()[scenario](rank, ranks, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def policies_match_single_process(rank, ranks, wrapper):
    """clip=ZClip and skip=SpikeSkip(loss=...) under DDP or FSDP2: every rank reaches the
    single-process decisions (the norm is global, the loss averaged over ranks) and parameters;
    track_param_norms gives each (sharded) parameter's global norm; a mid-cycle round trip through
    torch.distributed.checkpoint's get_state_dict / set_state_dict carries the policies' state."""
    from gradfuse import SpikeSkip, ZClip

    k, cycles = 2, 24
    gen = torch.Generator().manual_seed(7)
    rows = ROWS_PER_RANK * ranks
    batches = []
    for t in range(cycles * k):
        x = torch.randn(rows, 5, generator=gen, dtype=torch.float64)
        y = torch.randn(rows, 3, generator=gen, dtype=torch.float64) * (40.0 if t % 13 == 12 else 1.0)
        batches.append((x.to(DEVICE), y.to(DEVICE)))

    def make_opt(params):
        return FusedAccumSGD(params, lr=0.1, momentum=0.9, accumulation_steps=k, clip=ZClip(warmup_steps=3),
                             skip=SpikeSkip(window=6, sigma=2.0), track_param_norms=True)

    def train(model, opt, rows_of, resume_at=None):
        decisions = []
        for t, batch in enumerate(batches):
            if t == resume_at:  # mid-cycle, through torch.distributed.checkpoint's in-memory state dicts
                from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
                model_sd, optim_sd = get_state_dict(model, opt)
                opt = make_opt(model.parameters())
                set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
            x, y = rows_of(batch)
            if policy_micro_step(model, opt, x, y, opt.zero_grad):
                decisions.append(opt.last_step_skipped.clone())
        return torch.stack(decisions), opt

    single = make_model()
    single_opt = make_opt(single.parameters())
    expected_decisions, single_opt = train(single, single_opt, lambda batch: batch)
    model = make_model()
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        fully_shard(model, mesh=init_device_mesh(DEVICE.type, (ranks,)))
    opt = make_opt(model.parameters())
    decisions, opt = train(model, opt, lambda batch: rank_rows(batch, rank, ranks), resume_at=len(batches) // 2 + 1)
    if not torch.equal(decisions, expected_decisions) or not bool(expected_decisions.any()):
        raise AssertionError(f"{wrapper}: skip decisions {decisions.tolist()} != single-process "
                             f"{expected_decisions.tolist()} (which must skip some cycle)")
    check_same_on_every_rank([decisions.to(torch.uint8), opt.skipped_steps], f"{wrapper} decisions")
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    check_close(params, [p.detach() for p in single.parameters()], f"{wrapper} with ZClip + SpikeSkip")
    check_close([opt.last_param_norms], [single_opt.last_param_norms], f"{wrapper} per-parameter norms", tol=1e-12)
