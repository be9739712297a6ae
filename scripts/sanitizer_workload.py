"""A small CUDA workload for compute-sanitizer: every op and a few optimizer cycles on odd
sizes, misaligned views (scalar prologues, lists misaligned against each other) and every dtype,
fp16/bf16 norm packs that take the float64 fallback, plus lists that cross launch-table edges,
both table tiers and multi-unit norm chunks, and AdamW (amsgrad on and off, fp64, bf16 params with
fp32 gradients, misaligned views, more than 540 tensors, a skipped cycle); small, so the four
tools finish quickly."""
import torch

import gradfuse
from gradfuse import ops

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SIZES = (0, 1, 3, 33, 1000, 4099, 70001)


def misaligned(n, dtype):
    """A tensor whose data pointer is not 16-byte aligned (forces the scalar path)."""
    return torch.randn(n + 1, device="cuda").to(dtype)[1:]


def run_ops():
    for dtype in DTYPES:
        for make in (lambda n, d: torch.randn(n, device="cuda").to(d), misaligned):
            params = [make(n, dtype) for n in SIZES]
            grads = [make(n, dtype) for n in SIZES]
            acc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            accs = [torch.randn(n, device="cuda", dtype=acc_dtype) for n in SIZES]
            state = ops.new_norm_state("cuda")
            ops.accumulate_(accs, grads, 0.5, False, state, 2.0)
            ops.accumulate_(accs, grads, 1.0, True, state, float("inf"))
            ops.accumulate_norm_(state, grads, 2.0)
            skipped = torch.zeros((), dtype=torch.int64, device="cuda")
            total = ops.finalize_norm_(state, skipped, 2.0, 0.25, True)
            ops.global_norm(grads, float("inf"))
            buffers = [torch.zeros_like(p) for p in params]
            flags = [torch.zeros((), dtype=torch.bool, device="cuda") for _ in params]
            for lr in (0.01, torch.tensor(0.01, device="cuda")):
                ops.clipped_sgd_step_(params, accs, buffers, flags, total, lr, weight_decay=0.01, momentum=0.9,
                                      nesterov=True, grad_scale=0.25, max_norm=1.0)


def run_same_phase_and_half_norms():
    """Accumulators and gradients one element past alignment (prologue + packs), and bf16/fp16
    norms of packs that are huge, tiny, zero or mixed (the float and float64 pack paths)."""
    accs = [misaligned(n, torch.float32) for n in SIZES]
    state = ops.new_norm_state("cuda")
    ops.accumulate_(accs, [misaligned(n, torch.bfloat16) for n in SIZES], 0.5, False, state, 2.0)
    for dtype in (torch.bfloat16, torch.float16):
        values = torch.randn(70001, device="cuda")
        values[:1000] *= 1e30 if dtype == torch.bfloat16 else 1e4
        values[1000:2000] *= 1e-30 if dtype == torch.bfloat16 else 1e-7
        values[2000:3000] = 0
        tensor = values.to(dtype)
        ops.global_norm([tensor, tensor[3:]], 2.0)
        ops.global_norm([tensor], float("inf"))


def run_multi_launch():
    """800 tensors (two launches of the 4-list update: full and small tables) and one of 5M
    elements (norm chunks of two units): the table-edge and chunk-edge paths of the launcher."""
    sizes = [1 + i % 37 for i in range(800)] + [5_000_001]
    params = [torch.randn(n, device="cuda") for n in sizes]
    accs = [torch.randn(n, device="cuda") for n in sizes]
    state = ops.new_norm_state("cuda")
    ops.accumulate_(accs, [torch.randn(n, device="cuda") for n in sizes], 1.0, False, state, 2.0)
    total = ops.finalize_norm_(state, torch.zeros((), dtype=torch.int64, device="cuda"), 2.0, 1.0, True)
    buffers = [torch.zeros_like(p) for p in params]
    flags = [torch.zeros((), dtype=torch.bool, device="cuda") for _ in params]
    ops.clipped_sgd_step_(params, accs, buffers, flags, total, 0.01, momentum=0.9, max_norm=1.0)


def adamw_call(sizes, param_dtype, grad_dtype, make, amsgrad, norms=(3.0,)):
    params = [make(n, param_dtype) for n in sizes]
    grads = [make(n, grad_dtype) for n in sizes]
    exp_avgs = [make(n, param_dtype) for n in sizes]
    exp_avg_sqs = [make(n, param_dtype).square() for n in sizes]
    maxes = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(i % 7), device="cuda") for i in range(len(sizes))]
    for norm in norms:
        total = torch.tensor(norm, dtype=torch.float64, device="cuda")
        ops.clipped_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, maxes, steps, total, 0.01,
                                weight_decay=0.01, amsgrad=amsgrad, grad_scale=0.5, max_norm=1.0)


def run_adamw():
    """The AdamW kernel on every storage pair, aligned (amsgrad off) and misaligned (amsgrad on),
    a finite norm and a non-finite one (the skipped cycle); then 560 tensors with amsgrad (more than
    the 540 one 32 KB table holds at depth 6: two launches)."""
    aligned = lambda n, d: torch.randn(n, device="cuda").to(d)  # noqa: E731
    for param_dtype, grad_dtype in ((torch.float32, torch.float32), (torch.float64, torch.float64),
                                    (torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        adamw_call(SIZES, param_dtype, grad_dtype, aligned, False, norms=(3.0, float("nan")))
        adamw_call(SIZES, param_dtype, grad_dtype, misaligned, True, norms=(3.0, float("nan")))
    adamw_call([1 + i % 29 for i in range(560)], torch.float32, torch.float32, aligned, True)


def run_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5)).cuda()
    for make in (lambda: gradfuse.FusedAccumSGD(model.parameters(), lr=0.05, momentum=0.9, accumulation_steps=3,
                                                max_grad_norm=1.0),
                 lambda: gradfuse.FusedAccumAdamW(model.parameters(), lr=0.01, amsgrad=True, accumulation_steps=3,
                                                  max_grad_norm=1.0)):
        opt = make()
        for _ in range(9):
            model(torch.randn(8, 33, device="cuda")).square().mean().backward()
            opt.step()
            opt.zero_grad()
    torch.cuda.synchronize()


if __name__ == "__main__":
    assert torch.cuda.is_available() and gradfuse.cuda_compiled, "needs a GPU and a CUDA build of gradfuse"
    run_ops()
    run_same_phase_and_half_norms()
    run_multi_launch()
    run_adamw()
    run_optimizer()
    print("sanitizer workload finished")
