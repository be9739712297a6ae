"""End-to-end training cycles with real autograd, gradfuse vs torch, as timing.Bench objects.

The cycle/boundary cases (cases.py) model autograd's accumulation into .grad by one
torch._foreach_add_; here autograd does it for real. Each micro-batch runs a forward pass
`loss = (cat(params) * x).sum()` on fresh data and its backward, which hands every parameter
its own gradient through AccumulateGrad, exactly as in a training loop:

  gradfuse   loss.backward(); opt.step(); opt.zero_grad()  after every micro-batch
             (FusedAccumSGD(accumulation_steps=K, max_grad_norm=1.0)).
  gradfuse_flat  the same with flat_buffers=True (autograd adds into the flat .grad views).
  torch_*    (loss / K).backward() after every micro-batch (autograd adds into .grad, one
             in-place add per parameter), then clip_grad_norm_(foreach=True), SGD(fused=True
             resp. foreach=True).step(), zero_grad() once per cycle.

The forward/backward work is identical in both, so the ratio is what a user's loop gains;
it is diluted by that shared work, unlike the cycle rows. (Not run for GPT-2 on CPU: there every
micro-batch maps and page-faults fresh 500 MB buffers, whose variance swamps the difference.)
"""
import torch

from .cases import MAX_NORM, make_optimizer, make_params
from .timing import Bench
from .workloads import total_params


def _loss(params, x):
    return (torch.cat([p.reshape(-1) for p in params]) * x).sum()


def bytes_per_set(shapes, dtype, K, n_impls):
    """Memory one rotation set holds: K micro-batch inputs, and per implementation the
    parameters, momentum and gradients (plus the forward's concatenation)."""
    e = torch.empty((), dtype=dtype).element_size()
    return total_params(shapes) * e * (K + 1 + 3 * n_impls)


def training_benches(shapes, dtype, device, K, n_sets, impls):
    """name -> Bench of one K-micro-batch training cycle. Returns (benches, keepalive)."""
    n = total_params(shapes)
    data = [[(torch.randn(n, device=device) * 1e-3).to(dtype) for _ in range(K)] for _ in range(n_sets)]
    benches, keep = {}, [data]
    for name in impls:
        states = []
        for _ in range(n_sets):
            params = make_params(shapes, dtype, device)
            opt = make_optimizer(name, params, K)
            if opt is not None:
                states.append((params, opt))
        if not states:
            continue
        keep.append(states)
        benches[name] = Bench(_gradfuse_cycle(states, data, K) if name.startswith("gradfuse") else
                              _torch_cycle(states, data, K), None, n_sets)
    return benches, keep


def _gradfuse_cycle(states, data, K):
    def cycle(i):
        params, opt = states[i]
        for k in range(K):
            _loss(params, data[i][k]).backward()
            opt.step()
            opt.zero_grad()
    return cycle


def _torch_cycle(states, data, K):
    def cycle(i):
        params, opt = states[i]
        for k in range(K):
            (_loss(params, data[i][k]) / K).backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        opt.step()
        opt.zero_grad()
    return cycle
