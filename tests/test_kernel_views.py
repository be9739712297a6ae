"""Complex parameters (updated on their real view; the norm counts |z|^2) and non-dense parameters
(strided views, updated through a contiguous working copy) train as torch.optim.SGD / AdamW plus
torch.nn.utils.clip_grad_norm_ train them, checkpoint and copy like any other parameter."""
import copy

import pytest
import torch

from gradfuse import FusedAccumAdamW, FusedAccumSGD

RULES = {
    "sgd": (FusedAccumSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01,
                                                   nesterov=False)),
    "sgd_nesterov": (FusedAccumSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.8, weight_decay=0.02, nesterov=True,
                                                            maximize=True)),
    "adamw": (FusedAccumAdamW, torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    "adamw_amsgrad": (FusedAccumAdamW, torch.optim.AdamW, dict(lr=0.02, weight_decay=0.05, amsgrad=True)),
}
REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


class Params:
    """Two identical sets: complex tensors (odd sizes, one element, empty), a real one, and gappy
    views of a bigger real tensor whose other elements must never change."""

    def __init__(self, seed, complex_dtype):
        g = torch.Generator().manual_seed(seed)
        real = REAL[complex_dtype]
        self.values = [torch.randn(shape, generator=g, dtype=complex_dtype) for shape in ((5, 3), (33,), (1,), (0,))]
        self.values.append(torch.randn(7, generator=g, dtype=real))
        self.base = torch.randn(6, 9, generator=g, dtype=real)
        self.complex_base = torch.randn(4, 6, generator=g, dtype=complex_dtype)

    def make(self):
        base, complex_base = self.base.clone(), self.complex_base.clone()
        params = [v.clone().requires_grad_() for v in self.values]
        params += [base[:, ::2].requires_grad_(), base.t()[1::4].requires_grad_(), complex_base[::2, 1:5].requires_grad_()]
        return params, (base, complex_base)


def untouched(bases, initial):
    """The elements of the bases no parameter views (columns 1,3,5,7 minus the t()[1::4] rows; odd rows)."""
    base, complex_base = bases
    mask = torch.ones_like(base, dtype=torch.bool)
    mask[:, ::2] = False
    mask.t()[1::4] = False
    cmask = torch.ones_like(complex_base, dtype=torch.bool)
    cmask[::2, 1:5] = False
    return torch.equal(base[mask], initial.base[mask]) and torch.equal(complex_base[cmask], initial.complex_base[cmask])


def grads_for(params, g):
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def train_torch(opt, params, k, max_norm, batches):
    norms = []
    for cycle in batches:
        sums = [torch.zeros_like(p) for p in params]
        for grads in cycle:
            for s, g in zip(sums, grads):
                s += g
        for p, s in zip(params, sums):
            p.grad = s / k
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))))
        opt.step()
        opt.zero_grad()
    return norms


def train_fused(opt, params, batches):
    norms = []
    for cycle in batches:
        for grads in cycle:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            opt.zero_grad()
        norms.append(None if opt.last_grad_norm is None else float(opt.last_grad_norm))
    return norms


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("k,max_norm", [(1, None), (3, 0.5), (2, 50.0)])
@pytest.mark.parametrize("complex_dtype", [torch.complex128, torch.complex64])
def test_complex_and_strided_params_train_like_torch(rule, k, max_norm, complex_dtype):
    fused_cls, torch_cls, hyper = RULES[rule]
    initial = Params(11, complex_dtype)
    g = torch.Generator().manual_seed(12)
    ours, our_bases = initial.make()
    theirs, their_bases = initial.make()
    batches = [[grads_for(ours, g) for _ in range(k)] for _ in range(4)]
    opt = fused_cls(ours, accumulation_steps=k, max_grad_norm=max_norm, **hyper)
    our_norms = train_fused(opt, ours, batches)
    their_norms = train_torch(torch_cls(theirs, foreach=False, **hyper), theirs, k, max_norm, batches)
    tol = 1e-12 if complex_dtype == torch.complex128 else 2e-6
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype and a.stride() == b.stride(), f"parameter {i} changed its layout"
        torch.testing.assert_close(a.detach(), b.detach(), rtol=tol, atol=tol, msg=f"parameter {i}")
    if max_norm is not None:
        assert our_norms == pytest.approx(their_norms, rel=tol), "the norm counts |z|^2 of every element"
    assert untouched(our_bases, initial), "elements outside the strided views were written"
    for p in ours[:4]:
        state = opt.state[p]
        keys = ("momentum_buffer",) if rule.startswith("sgd") else ("exp_avg", "exp_avg_sq")
        assert all(state[key].dtype == p.dtype and state[key].shape == p.shape for key in keys), "state like torch's"


@pytest.mark.parametrize("rule", ["sgd", "adamw_amsgrad"])
def test_mid_cycle_checkpoint_and_copy_resume_bitwise(rule):
    fused_cls, torch_cls, hyper = RULES[rule]
    initial = Params(21, torch.complex128)
    g = torch.Generator().manual_seed(22)
    k = 3
    reference, _ = initial.make()
    batches = [[grads_for(reference, g) for _ in range(k)] for _ in range(3)]
    ref_opt = fused_cls(reference, accumulation_steps=k, max_grad_norm=1.0, **hyper)
    train_fused(ref_opt, reference, batches)

    ours, _ = initial.make()
    opt = fused_cls(ours, accumulation_steps=k, max_grad_norm=1.0, **hyper)
    train_fused(opt, ours, batches[:1])
    for p, grad in zip(ours, batches[1][0]):  # one micro-batch into the second cycle
        p.grad = grad.clone()
    opt.step()
    opt.zero_grad()
    saved, copied = opt.state_dict(), copy.deepcopy((opt, ours))
    assert saved["gradfuse"]["accumulators"][0].dtype == torch.complex128, "a saved running sum is like its gradient"
    resumed, _ = initial.make()
    with torch.no_grad():
        for p, q in zip(resumed, ours):
            p.copy_(q)
    new_opt = fused_cls(resumed, accumulation_steps=k, max_grad_norm=1.0, **hyper)
    new_opt.load_state_dict(saved)
    copy_opt, copy_params = copied
    for o, params in ((new_opt, resumed), (copy_opt, copy_params)):
        assert o.micro_step == 1
        train_fused(o, params, [batches[1][1:], *batches[2:]])
        for i, (a, b) in enumerate(zip(params, reference)):
            assert torch.equal(a.detach(), b.detach()), f"parameter {i} after resuming"


def test_torch_optimizer_loads_the_state_of_complex_params():
    fused_cls, torch_cls, hyper = RULES["adamw"]
    initial = Params(31, torch.complex64)
    g = torch.Generator().manual_seed(32)
    ours, _ = initial.make()
    theirs, _ = initial.make()
    batches = [[grads_for(ours, g)] for _ in range(4)]
    opt = fused_cls(ours, **hyper)
    train_fused(opt, ours, batches[:2])
    torch_opt = torch_cls(theirs, foreach=False, **hyper)
    with torch.no_grad():
        for p, q in zip(theirs, ours):
            p.copy_(q)
    saved = copy.deepcopy(opt.state_dict())  # torch keeps complex state tensors as given: not shared with ours
    saved.pop("gradfuse")
    torch_opt.load_state_dict(saved)
    train_fused(opt, ours, batches[2:])
    train_torch(torch_opt, theirs, 1, None, batches[2:])
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-6, atol=2e-6, msg=f"parameter {i}")


def test_complex_model_with_backward_hooks_matches_default_mode():
    g = torch.Generator().manual_seed(41)
    weight = torch.randn(6, 4, generator=g, dtype=torch.complex128)
    inputs = [torch.randn(5, 6, generator=g, dtype=torch.complex128) for _ in range(4)]
    results = []
    for in_backward in (False, True):
        w = weight.clone().requires_grad_()
        bias = torch.zeros(8, dtype=torch.float64)[::2].requires_grad_()  # a non-dense real parameter
        opt = FusedAccumSGD([w, bias], lr=0.05, momentum=0.9, accumulation_steps=2, max_grad_norm=1.0,
                            accumulate_in_backward=in_backward)
        for x in inputs:
            ((x @ w).abs().sum() + (bias * torch.arange(4.0, dtype=torch.float64)).sum()).backward()
            if in_backward:
                assert w.grad is None and bias.grad is None, "the hooks free .grad"
            opt.step()
            opt.zero_grad()
        results.append((w.detach().clone(), bias.detach().clone(), float(opt.last_grad_norm)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]
