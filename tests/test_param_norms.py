"""track_param_norms=True: opt.last_param_norms holds each parameter's pre-clip norm of its cycle
gradient (the mean over the cycle), from the fused pass itself, checked against a float64
reference per parameter, in every storage mode; the global norm's bits do not change with it."""
import pytest
import torch
from torch import nn

import gradfuse
from gradfuse import FusedAccumAdamW, FusedAccumSGD

SHAPES = [(33, 7), (1,), (0,), (20001,), (5, 3)]  # a tensor over one 16K-element chunk, one element, an empty one
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.float16]


def make(seed, dtypes=DTYPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(d).requires_grad_() for s, d in zip(SHAPES, dtypes)]


def reference_norms(cycle, k, norm_type):
    """Per parameter: the norm of the mean of its micro-batch gradients (missing ones count as 0), float64."""
    norms = []
    for i in range(len(cycle[0])):
        total = sum(grads[i].double() for grads in cycle if grads[i] is not None) / k
        empty = not torch.is_tensor(total) or total.numel() == 0  # an empty parameter's norm is 0 (torch: no inf-norm)
        norms.append(0.0 if empty else float(torch.linalg.vector_norm(total, norm_type)))
    return norms


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and gradfuse.cuda_compiled), reason="needs a CUDA device and a CUDA build"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mode", ["default", "accumulate_in_backward", "flat_buffers"])
def test_per_parameter_norms_match_a_float64_reference(mode, k, norm_type, device):
    dtypes = DTYPES if mode != "flat_buffers" else [torch.float32] * len(SHAPES)
    params = [p.detach().to(device).requires_grad_() for p in make(1, dtypes)]
    opt = FusedAccumSGD(params, lr=0.01, momentum=0.9, accumulation_steps=k, max_grad_norm=1.0, norm_type=norm_type,
                        track_param_norms=True, **({mode: True} if mode != "default" else {}))
    g = torch.Generator().manual_seed(2)
    for cycle_index in range(3):
        cycle = []
        for m in range(k):
            grads = [(torch.randn(p.shape, generator=g) * (i + 1)).to(device=device, dtype=p.dtype)
                     for i, p in enumerate(params)]
            if mode == "default" and k > 1 and m == 1:
                grads[0] = None  # a parameter without a gradient in one micro-batch (the general path)
            cycle.append(grads)
            if mode == "accumulate_in_backward":
                loss = sum((p.float() * grad.float()).sum() for p, grad in zip(params, grads))
                loss.backward()
            else:
                for p, grad in zip(params, grads):
                    if mode == "flat_buffers":
                        if grad is not None:
                            p.grad.add_(grad)
                    else:
                        p.grad = None if grad is None else grad.clone()
            opt.step()
            opt.zero_grad()
        expected = reference_norms([[None if x is None else x.cpu() for x in grads] for grads in cycle], k, norm_type)
        got = opt.last_param_norms.tolist()
        assert opt.last_param_norms.dtype == torch.float64 and len(got) == len(params)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert a == pytest.approx(b, rel=1e-6 if dtypes[i] != torch.float64 else 1e-12, abs=1e-30), \
                f"cycle {cycle_index}, parameter {i}: {a} != {b}"
        whole = torch.linalg.vector_norm(torch.tensor(got, dtype=torch.float64), norm_type)
        assert float(opt.last_grad_norm) == pytest.approx(float(whole), rel=1e-12), "the parts make the whole"


def test_tracking_leaves_the_global_norm_and_the_update_bitwise_unchanged():
    runs = []
    for track in (False, True):
        params = make(3)
        opt = FusedAccumAdamW(params, lr=0.01, accumulation_steps=2, max_grad_norm=0.5, track_param_norms=track)
        g = torch.Generator().manual_seed(4)
        norms = []
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()
            opt.zero_grad()
            if opt.micro_step == 0:
                norms.append(opt.last_grad_norm.clone())
        runs.append((params, norms))
    (a, norms_a), (b, norms_b) = runs
    assert all(torch.equal(x, y) for x, y in zip(norms_a, norms_b))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_param_norms_by_name():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = FusedAccumSGD(model.parameters(), lr=0.1, track_param_norms=True)
    with pytest.raises(RuntimeError, match="no per-parameter norms yet"):
        opt.param_norms(model)
    model(torch.randn(5, 4)).square().sum().backward()
    grads = {name: float(p.grad.norm()) for name, p in model.named_parameters()}
    opt.step()
    assert opt.param_norms(model) == pytest.approx(grads, rel=1e-6)
    named = FusedAccumSGD(model.named_parameters(), lr=0.1, track_param_norms=True)
    model(torch.randn(5, 4)).square().sum().backward()
    named.step()
    assert list(named.param_norms()) == [name for name, _ in model.named_parameters()]


def test_flag_must_be_a_bool():
    with pytest.raises(TypeError, match="track_param_norms must be a bool"):
        FusedAccumSGD([torch.zeros(3, requires_grad=True)], lr=0.1, track_param_norms=1)
    assert "track_param_norms" in gradfuse.hyperparameters.OPTIMIZER_WIDE
