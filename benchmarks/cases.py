"""gradfuse vs torch implementations of each benchmarked case, as timing.Bench objects.

Cycle / boundary cases (one K-micro-batch optimizer cycle on a list of parameter shapes):
  gradfuse        FusedAccumSGD(accumulation_steps=K, max_grad_norm=1.0 | None, skip_nonfinite=clip),
                  so the unclipped case, like torch's, runs no norm pass; each
                  micro-step assigns p.grad = a pre-generated random gradient (simulating
                  autograd) and calls step(); the first micro-batch's gradient is adopted
                  as the accumulator and modified in place, so an untimed setup restores it
                  (torch._foreach_copy_) before every repetition.
  torch_fused     p.grad = the same first gradient, torch._foreach_add_(grads, micro_k) for
  torch_foreach   micro-steps 2..K (autograd's accumulation into .grad), then
                  clip_grad_norm_(params, 1.0, foreach=True) (omitted for clip=False), then
                  torch.optim.SGD(fused=True) resp. SGD(foreach=True).step(). The loss is
                  assumed divided by K (no extra scaling pass; gradfuse folds 1/K into its
                  update). Untimed setup restores the first gradient (clip scales it in place).
  gradfuse_flat   the same FusedAccumSGD with flat_buffers=True: each micro-step adds the
                  micro-batch's gradients into the .grad views of the flat buffer with one
                  torch._foreach_add_ (what autograd's AccumulateGrad does in place, one add per
                  tensor) and calls step(); zero_grad() (one memset) ends the timed cycle.
  "boundary" times only the last micro-step (its untimed setup runs micro-steps 1..K-1).

Op cases (fp32, and bf16/fp16 on CUDA): accumulate_, accumulate_ with norm, global_norm, clipped_sgd_step_ vs
_foreach_add_, _foreach_add_ + get_total_norm, get_total_norm (what clip_grad_norm_ uses),
and the SGD step (fused / foreach).

Hyperparameters: lr=1e-4, momentum=0.9, no weight decay, max_norm=1.0; data is random
(gradients ~ 1e-3 * N(0,1)), so values stay finite while the state evolves.
"""
import torch

import gradfuse
from gradfuse import ops

from .workloads import numel

LR, MOMENTUM, MAX_NORM = 1e-4, 0.9, 1.0
TORCH_IMPLS = ("torch_fused", "torch_foreach")


def make_optimizer(name, params, K=1, max_norm=MAX_NORM):
    """The optimizer an implementation name stands for (None for a name that is not one): gradfuse
    in its default or flat-buffer mode, or torch.optim.SGD fused / foreach."""
    if name in ("gradfuse", "gradfuse_flat"):
        return gradfuse.FusedAccumSGD(params, lr=LR, momentum=MOMENTUM, accumulation_steps=K, max_grad_norm=max_norm,
                                      flat_buffers=name == "gradfuse_flat")
    if name == "gradfuse_param_norms":  # per-parameter norms from the same pass
        return gradfuse.FusedAccumSGD(params, lr=LR, momentum=MOMENTUM, accumulation_steps=K, max_grad_norm=max_norm,
                                      track_param_norms=True)
    if name in TORCH_IMPLS:
        kw = {"fused": True} if name == "torch_fused" else {"foreach": True}
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **kw)
    return None


def _randn(shapes, dtype, device, scale, generator=None):
    return [(torch.randn(s, device=device, dtype=torch.float32) * scale).to(dtype) for s in shapes]


def make_params(shapes, dtype, device):
    return [torch.nn.Parameter((torch.randn(s, device=device) * 0.02).to(dtype)) for s in shapes]


class GradSet:
    """One rotation set of pre-generated micro-batch gradients (read only) plus the
    restorable working copy of the first one."""

    def __init__(self, shapes, dtype, device, K):
        self.micro = [_randn(shapes, dtype, device, 1e-3) for _ in range(K)]
        self.work = [g.clone() for g in self.micro[0]]

    def restore(self):
        torch._foreach_copy_(self.work, self.micro[0])


def _assign(params, grads):
    for p, g in zip(params, grads):
        p.grad = g


def cycle_benches(shapes, dtype, device, K, clip, n_sets, impls, boundary_only=False):
    """name -> Bench for one cycle (or boundary) case. Returns (benches, keepalive)."""
    from .timing import Bench
    sets = [GradSet(shapes, dtype, device, K) for _ in range(n_sets)]
    benches = {}
    max_norm = MAX_NORM if clip else None
    last = K - 1

    if "gradfuse" in impls:
        gf_states = []  # (distinct name: the closures below bind late)
        for _ in range(n_sets):
            params = make_params(shapes, dtype, device)
            # Without clipping the baseline checks nothing, so neither does gradfuse (no norm pass).
            opt = gradfuse.FusedAccumSGD(params, lr=LR, momentum=MOMENTUM, accumulation_steps=K,
                                         max_grad_norm=max_norm, skip_nonfinite=clip)
            gf_states.append((params, opt))

        def gf_micro(i, k):
            params, opt = gf_states[i]
            _assign(params, sets[i].work if k == 0 else sets[i].micro[k])
            opt.step()

        if boundary_only:
            def gf_setup(i):
                sets[i].restore()
                for k in range(last):
                    gf_micro(i, k)

            benches["gradfuse"] = Bench(lambda i: gf_micro(i, last), gf_setup, n_sets)
        else:
            def gf_cycle(i):
                for k in range(K):
                    gf_micro(i, k)

            benches["gradfuse"] = Bench(gf_cycle, lambda i: sets[i].restore(), n_sets)

    if "gradfuse_flat" in impls:
        benches["gradfuse_flat"] = _flat_bench(shapes, dtype, device, K, max_norm, sets, boundary_only)

    for name in impls:
        if name not in TORCH_IMPLS:
            continue
        torch_states = []
        for _ in range(n_sets):
            params = make_params(shapes, dtype, device)
            kw = {"fused": True} if name == "torch_fused" else {"foreach": True}
            torch_states.append((params, torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **kw)))

        def make(states=torch_states):
            def first(i):
                _assign(states[i][0], sets[i].work)

            def add(i, k):
                torch._foreach_add_(sets[i].work, sets[i].micro[k])

            def finish(i):
                params, opt = states[i]
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
                opt.step()

            def cycle(i):
                first(i)
                for k in range(1, K):
                    add(i, k)
                finish(i)

            def boundary_setup(i):
                sets[i].restore()
                first(i)
                for k in range(1, last):
                    add(i, k)

            def boundary(i):
                if last == 0:
                    first(i)
                else:
                    add(i, last)
                finish(i)

            if boundary_only:
                return Bench(boundary, boundary_setup, n_sets)
            return Bench(cycle, lambda i: sets[i].restore(), n_sets)

        benches[name] = make()
    return benches, sets


def _flat_bench(shapes, dtype, device, K, max_norm, sets, boundary_only):
    """gradfuse_flat's Bench: gradients added in place into the flat .grad views, as autograd would."""
    from .timing import Bench
    states = []
    for _ in sets:
        params = make_params(shapes, dtype, device)
        opt = gradfuse.FusedAccumSGD(params, lr=LR, momentum=MOMENTUM, accumulation_steps=K, max_grad_norm=max_norm,
                                     skip_nonfinite=max_norm is not None, flat_buffers=True)
        states.append((opt, [p.grad for p in params]))

    def micro(i, k):
        opt, views = states[i]
        torch._foreach_add_(views, sets[i].micro[k])
        opt.step()

    if boundary_only:
        def setup(i):
            states[i][0].zero_grad()
            for k in range(K - 1):
                micro(i, k)

        return Bench(lambda i: micro(i, K - 1), setup, len(sets))

    def cycle(i):
        for k in range(K):
            micro(i, k)
        states[i][0].zero_grad()

    return Bench(cycle, None, len(sets))


OPS = ("accumulate", "accumulate_norm", "global_norm", "sgd_step")


def op_benches(op, shapes, device, n_sets, cuda_graphs=False, dtype=torch.float32):
    """name -> Bench for one op case: gradfuse vs torch equivalent(s). Gradients, parameters and
    momentum in `dtype`, accumulators in float32 for fp16/bf16 (as FusedAccumSGD keeps them)."""
    from .timing import Bench
    acc_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    data = []
    for _ in range(n_sets):
        d = {"grads": _randn(shapes, dtype, device, 1e-3)}
        if op in ("accumulate", "accumulate_norm"):
            d["accs"] = _randn(shapes, acc_dtype, device, 1e-3)
            d["norm_state"] = ops.new_norm_state(device)
        if op == "sgd_step":
            d["gf_params"] = make_params(shapes, dtype, device)
            d["bufs"] = _randn(shapes, dtype, device, 1e-3)
            d["flags"] = [torch.ones((), dtype=torch.bool, device=device) for _ in shapes]
            d["total_norm"] = torch.tensor(2.0, dtype=torch.float64, device=device)
            for name in TORCH_IMPLS:
                params = make_params(shapes, dtype, device)
                _assign(params, d["grads"])
                kw = {"fused": True} if name == "torch_fused" else {"foreach": True}
                opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **kw)
                opt.step()  # creates the momentum buffers outside the timing
                d[name] = opt
        data.append(d)

    get_total_norm = torch.nn.utils.get_total_norm
    b = {}
    if op == "accumulate":
        b["gradfuse"] = lambda i: ops.accumulate_(data[i]["accs"], data[i]["grads"])
        b["torch_foreach"] = lambda i: torch._foreach_add_(data[i]["accs"], data[i]["grads"])
    elif op == "accumulate_norm":
        b["gradfuse"] = lambda i: ops.accumulate_(data[i]["accs"], data[i]["grads"], norm_state=data[i]["norm_state"])

        def torch_acc_norm(i):
            torch._foreach_add_(data[i]["accs"], data[i]["grads"])
            return get_total_norm(data[i]["accs"], 2.0, foreach=True)

        b["torch_foreach"] = torch_acc_norm
    elif op == "global_norm":
        b["gradfuse"] = lambda i: ops.global_norm(data[i]["grads"])
        b["torch_foreach"] = lambda i: get_total_norm(data[i]["grads"], 2.0, foreach=True)
    elif op == "sgd_step":
        b["gradfuse"] = lambda i: ops.clipped_sgd_step_(
            data[i]["gf_params"], data[i]["grads"], data[i]["bufs"], data[i]["flags"], data[i]["total_norm"], LR,
            momentum=MOMENTUM, max_norm=MAX_NORM)
        b["torch_fused"] = lambda i: data[i]["torch_fused"].step()
        b["torch_foreach"] = lambda i: data[i]["torch_foreach"].step()
    else:
        raise ValueError(op)
    benches = {name: Bench(fn, None, n_sets) for name, fn in b.items()}
    if cuda_graphs and torch.device(device).type == "cuda":
        for name, fn in b.items():
            benches[name + "@graph"] = Bench(fn, None, n_sets, cuda_graph=True)
    return benches, data


def footprint_bytes(shapes, dtype, K):
    """Bytes one cycle repetition touches (for input rotation): K+1 gradients, param,
    momentum and (bf16) an fp32 accumulator."""
    n = sum(numel(s) for s in shapes)
    e = torch.empty((), dtype=dtype).element_size()
    return n * ((K + 1) * e + 2 * e + (4 if e < 4 else 0))


def memory_per_set(shapes, dtype, K, n_impls):
    n = sum(numel(s) for s in shapes)
    e = torch.empty((), dtype=dtype).element_size()
    return n * ((K + 1) * e + n_impls * 2 * e + 4)
