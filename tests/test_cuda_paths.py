"""CUDA kernel paths that only a GPU reaches, each checked by value against the CPU op (same
element math: bitwise where the backends round alike) or against torch: a non-finite value
inside an fp16/bf16 pack of 8, the 32 KB table tier for float64 and half types, accumulate with a
norm over more than one full table, AdamW lists misaligned against each other, AdamW first used
inside graph capture, GradScaler with FusedAccumAdamW, and update kernels past 2^31 elements.
Every test skips cleanly without a GPU or with a CPU-only build."""
import math

import pytest
import torch

from data import randn, requires_cuda
from fresh_process import run_lazy_cuda_script
from scaled_steps import scaled_micro_step
from gradfuse import FusedAccumAdamW, ops
from tolerances import assert_bitwise, assert_close, assert_scalar_close

pytestmark = requires_cuda

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
INF = math.inf
# More tensors than the 4 KB tier holds for any op (135 at depth 2) and than one 32 KB table holds
# for accumulate (1159 at depth 2): small sizes so the lists stay cheap.
FULL_TIER_COUNT = 300
OVER_ONE_TABLE = 1200


def odd_sizes(count):
    return [1 + (7 * i) % 45 for i in range(count)]


def assert_all_bitwise(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bitwise(a.cpu(), b, f"{what} {i}")


# ------------------------------------------------------------------ non-finite inside a half pack
@pytest.mark.parametrize("value", [math.nan, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("position", [0, 3, 7, 21], ids=lambda p: f"at{p}")
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_nonfinite_inside_a_pack_of_eight_reaches_the_norm(dtype, position, value, gen):
    # 64 aligned elements: eight full packs and no scalar tail, so the value sits inside a pack.
    tensors = [randn((64,), dtype, "cuda", gen), randn((4096,), dtype, "cuda", gen)]
    tensors[0][position] = value
    cpu = [t.cpu() for t in tensors]
    for norm_type in (2.0, INF):  # NaN payloads may differ between backends: values compared, NaN as NaN
        got, want = ops.global_norm(tensors, norm_type), float(ops.global_norm(cpu, norm_type))
        assert_scalar_close(got, want, dtype, f"global_norm({norm_type})")
        assert not math.isfinite(want), "the non-finite element was lost"
    accs = [randn(t.shape, F32, "cuda", gen) for t in tensors]
    accs_cpu = [a.cpu() for a in accs]
    state, state_cpu = ops.new_norm_state("cuda"), ops.new_norm_state("cpu")
    ops.accumulate_(accs, tensors, 0.5, False, state, 2.0)
    ops.accumulate_(accs_cpu, cpu, 0.5, False, state_cpu, 2.0)
    for i, (a, b) in enumerate(zip(accs, accs_cpu)):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True, msg=f"accumulator {i}")
    skipped = torch.zeros((), dtype=torch.int64, device="cuda")
    total = ops.finalize_norm_(state, skipped, 2.0, 1.0, True)
    assert not math.isfinite(float(total)) and int(skipped) == 1, "the cycle must count as skipped"


# ------------------------------------------------------------------ 32 KB tier, more than one table
@pytest.mark.parametrize("dtype", [F64, F16, BF16])
def test_full_table_tier_for_float64_and_half_types(dtype, gen):
    sizes = odd_sizes(FULL_TIER_COUNT)
    acc_dtype = F64 if dtype == F64 else F32
    grads = [randn((n,), dtype, "cuda", gen) for n in sizes]
    accs = [randn((n,), acc_dtype, "cuda", gen) for n in sizes]
    params = [randn((n,), dtype, "cuda", gen) for n in sizes]
    buffers = [randn((n,), dtype, "cuda", gen) for n in sizes]
    flags = [torch.ones((), dtype=torch.bool, device="cuda") for _ in sizes]
    cpu = [[t.cpu() for t in ts] for ts in (params, accs, buffers, flags, grads)]
    state, state_cpu = ops.new_norm_state("cuda"), ops.new_norm_state("cpu")
    ops.accumulate_(accs, grads, 0.5, False, state, 2.0)
    ops.accumulate_(cpu[1], cpu[4], 0.5, False, state_cpu, 2.0)
    assert_all_bitwise(accs, cpu[1], "accumulator")
    assert_scalar_close(state[0], float(state_cpu[0]), acc_dtype, "norm state")
    total = torch.tensor(3.0, dtype=F64)
    hyper = dict(weight_decay=0.01, momentum=0.9, max_norm=1.0)
    ops.clipped_sgd_step_(params, accs, buffers, flags, total.cuda(), 0.05, **hyper)
    ops.clipped_sgd_step_(cpu[0], cpu[1], cpu[2], cpu[3], total, 0.05, **hyper)
    for i in range(len(sizes)):
        assert_close(params[i], cpu[0][i].double(), dtype, f"param {i}")
        assert_close(buffers[i], cpu[2][i].double(), dtype, f"momentum buffer {i}")


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_accumulate_with_norm_over_more_than_one_table(dtype, gen):
    sizes = odd_sizes(OVER_ONE_TABLE)
    grads = [randn((n,), dtype, "cuda", gen) for n in sizes]
    accs = [randn((n,), F32, "cuda", gen) for n in sizes]
    accs_cpu, grads_cpu = [a.cpu() for a in accs], [g.cpu() for g in grads]
    state, state_cpu = ops.new_norm_state("cuda"), ops.new_norm_state("cpu")
    ops.accumulate_(accs, grads, 1.0, False, state, 2.0)
    ops.accumulate_(accs_cpu, grads_cpu, 1.0, False, state_cpu, 2.0)
    assert_all_bitwise(accs, accs_cpu, "accumulator")
    exact = math.fsum(float(a.double().square().sum()) for a in accs_cpu)
    assert_scalar_close(state[0], exact, F32, "norm state over two launches")
    assert_bitwise(ops.global_norm(accs, INF).cpu(), ops.global_norm(accs_cpu, INF), "inf-norm over two launches")


# ------------------------------------------------------------------ AdamW on the device
def adamw_lists(sizes, pair, offsets, gen, amsgrad=True):
    """params, grads, exp_avgs, exp_avg_sqs, maxes, steps: each list `offsets[k]` elements past
    16-byte alignment, so the lists are misaligned against each other."""
    param_dtype, grad_dtype = pair

    def at(n, dtype, offset, scale=1.0):
        return randn((n + offset,), dtype, "cuda", gen, scale)[offset:]

    params = [at(n, param_dtype, offsets[0]) for n in sizes]
    grads = [at(n, grad_dtype, offsets[1]) for n in sizes]
    exp_avgs = [at(n, param_dtype, offsets[2], 0.3) for n in sizes]
    exp_avg_sqs = [at(n, param_dtype, offsets[3], 0.5).square() for n in sizes]
    maxes = [v * 1.25 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(1 + i % 9), device="cuda") for i in range(len(sizes))]
    return [params, grads, exp_avgs, exp_avg_sqs, maxes, steps]


ADAMW_HYPER = dict(weight_decay=0.01, amsgrad=True, grad_scale=0.5, max_norm=1.0)


@pytest.mark.parametrize("offsets", [(1, 0, 0, 0), (0, 3, 1, 2), (2, 2, 2, 2), (0, 0, 5, 0)], ids=str)
@pytest.mark.parametrize("pair", [(F32, F32), (BF16, F32), (F16, F16)], ids=lambda p: f"{p[0]}-{p[1]}"[6:])
def test_adamw_lists_misaligned_against_each_other(pair, offsets, gen):
    lists = adamw_lists([1, 7, 33, 1024, 4099, 70001], pair, offsets, gen)
    cpu = [[t.cpu() for t in ts] for ts in lists]
    total = torch.tensor(3.0, dtype=F64)
    ops.clipped_adamw_step_(*lists, total.cuda(), 0.01, **ADAMW_HYPER)
    ops.clipped_adamw_step_(*cpu, total, 0.01, **ADAMW_HYPER)
    for name, got, want in zip(("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"), lists, cpu):
        assert_all_bitwise(got, want, name)


@pytest.mark.parametrize("pair", [(F64, F64), (BF16, F32)], ids=["float64", "bfloat16-float32"])
def test_adamw_full_table_tier(pair, gen):
    lists = adamw_lists(odd_sizes(FULL_TIER_COUNT * 3), pair, (0, 0, 0, 0), gen)  # past one 32 KB table too
    cpu = [[t.cpu() for t in ts] for ts in lists]
    total = torch.tensor(3.0, dtype=F64)
    ops.clipped_adamw_step_(*lists, total.cuda(), 0.01, **ADAMW_HYPER)
    ops.clipped_adamw_step_(*cpu, total, 0.01, **ADAMW_HYPER)
    if pair[0] == F64:  # beta^step from two pow libraries: the update (lr-sized) may differ far below 1e-13
        for got, want in zip(lists[0], cpu[0]):
            torch.testing.assert_close(got.cpu(), want, rtol=1e-13, atol=1e-13)
    else:
        assert_all_bitwise(lists[0], cpu[0], "param")
    assert_all_bitwise(lists[5], cpu[5], "step")


ADAMW_CAPTURE_SCRIPT = r"""
import torch
from gradfuse import ops

torch.manual_seed(0)
sizes = [1, 33, 4099, 70001]
params = [torch.randn(n, device="cuda").to(torch.bfloat16) for n in sizes]
grads = [torch.randn(n, device="cuda") for n in sizes]
exp_avgs = [torch.randn(n, device="cuda").to(torch.bfloat16) for n in sizes]
exp_avg_sqs = [torch.rand(n, device="cuda").to(torch.bfloat16) for n in sizes]
maxes = [v * 2 for v in exp_avg_sqs]
steps = [torch.tensor(3.0, device="cuda") for _ in sizes]
total = torch.tensor(5.0, dtype=torch.float64, device="cuda")
lr = torch.tensor(0.01, device="cuda")
tensors = params + exp_avgs + exp_avg_sqs + maxes + steps
initial = [t.clone() for t in tensors]
torch.cuda.synchronize()


def step():
    ops.clipped_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, maxes, steps, total, lr, weight_decay=0.01,
                            amsgrad=True, max_norm=1.0)


graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # no eager warm-up: the AdamW kernel is first used here
    step()
for _ in range(3):
    graph.replay()
torch.cuda.synchronize()
graphed = [t.clone() for t in tensors]
for t, t0 in zip(tensors, initial):
    t.copy_(t0)
for _ in range(3):
    step()
torch.cuda.synchronize()
assert all(float(s) == 6.0 for s in steps), [float(s) for s in steps]
for i, (a, b) in enumerate(zip(graphed, tensors)):
    assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), f"tensor {i}: graph != eager"
print("adamw first use in capture: ok")
"""


def test_adamw_first_used_inside_graph_capture_then_replayed_equals_eager():
    run_lazy_cuda_script(ADAMW_CAPTURE_SCRIPT)


@pytest.mark.parametrize("k", [1, 3])
def test_grad_scaler_with_adamw_matches_torch_unscale_and_clip(k, gen):
    """FusedAccumAdamW under scaler.step/update per micro-batch against torch.optim.AdamW with
    unscale_ per micro-batch, manual accumulation and clip_grad_norm_; one cycle holds an inf."""
    cycles, max_norm = 4, 0.5
    shapes = [(64, 33), (33,), (17, 5), ()]
    bad_t = k + k // 2
    grads = [[randn(s, F32, "cuda", gen) for s in shapes] for _ in range(k * cycles)]
    grads[bad_t][2].view(-1)[7] = INF
    initial = [randn(s, F32, "cuda", gen) for s in shapes]
    hyper = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    f_params, r_params = [t.clone() for t in initial], [t.clone() for t in initial]
    opt = FusedAccumAdamW(f_params, accumulation_steps=k, max_grad_norm=max_norm, **hyper)
    adamw = torch.optim.AdamW(r_params, **hyper)
    f_scaler, r_scaler = (torch.amp.GradScaler("cuda", init_scale=2.0 ** 12, growth_interval=2) for _ in range(2))
    for c in range(cycles):
        acc, cycle_bad = [torch.zeros_like(p) for p in r_params], False
        for m in range(k):
            row = grads[c * k + m]
            cycle_bad |= not scaled_micro_step(opt, f_params, f_scaler, adamw, r_params, r_scaler, row, acc)
            assert f_scaler.get_scale() == r_scaler.get_scale(), f"micro-step {c * k + m}: scales diverged"
        if not cycle_bad:
            for p, a in zip(r_params, acc):
                p.grad = a / k
            torch.nn.utils.clip_grad_norm_(r_params, max_norm)
            adamw.step()
            adamw.zero_grad()
        for i, (a, b) in enumerate(zip(f_params, r_params)):
            # torch divides each micro-gradient by K; gradfuse sums and scales once: a few ulps.
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=f"cycle {c}: param {i}")
    assert int(opt.skipped_steps) == 1


# ------------------------------------------------------------------ update kernels past 2^31 elements
BIG = 2**31 + 4099
PROBES = [slice(0, 5), slice(2**31 - 3, 2**31 + 3), slice(BIG - 7, BIG)]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.mem_get_info()[0] < 40 << 30,
                    reason="large_tensor: needs 40 GiB of free GPU memory")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_update_kernels_past_2_to_the_31_elements(optimizer):
    # Elementwise updates: the CPU op on a few slices (start, around 2^31, the tail) with the same
    # scalars gives the CUDA op's values there; nearly every element must have moved.
    g = torch.Generator(device="cuda")
    g.manual_seed(7)

    def big(scale=1.0, positive=False):
        t = torch.empty(BIG, dtype=BF16, device="cuda")
        return (t.uniform_(0.5, 1.5, generator=g) if positive else t.normal_(0.0, scale, generator=g))

    total = torch.tensor(3.0, dtype=F64)
    if optimizer == "sgd":
        lists = [[big()], [big()], [big()], [torch.ones((), dtype=torch.bool, device="cuda")]]
        call = ops.clipped_sgd_step_
        hyper = dict(weight_decay=0.01, momentum=0.9, nesterov=True, max_norm=1.0)
    else:
        lists = [[big()], [big()], [big(0.3)], [big(positive=True)], [], [torch.tensor(4.0, device="cuda")]]
        call = ops.clipped_adamw_step_
        hyper = dict(weight_decay=0.01, max_norm=1.0)
    before_params = lists[0][0].clone()
    cpu_slices = [[[t[s].cpu() if t.dim() else t.cpu() for t in ts] for ts in lists] for s in PROBES]
    call(*lists, total.cuda(), 0.01, **hyper)
    for j, pieces in enumerate(cpu_slices):
        call(*pieces, total, 0.01, **hyper)
        for k, (got_list, want_list) in enumerate(zip(lists, pieces)):
            for got, want in zip(got_list, want_list):
                got_piece = (got[PROBES[j]] if got.dim() else got).cpu()
                if got.is_floating_point() and got.dim():  # SGD's half-type rounding may differ by an ulp
                    assert_close(got_piece, want.double(), BF16, f"list {k}, probe {PROBES[j]}")
                else:
                    assert_bitwise(got_piece, want, f"list {k}, probe {PROBES[j]}")
    assert int((lists[0][0] == before_params).sum()) < BIG // 100, "most elements must have moved"
    del lists, before_params
    torch.cuda.empty_cache()
