"""Small training problems shared by the test files: a seeded MLP and its micro-batches, and the
float64 regression problem the Lightning / Accelerate client tests drive."""
import torch
from torch import nn

from data import generator, randn

F64 = torch.float64
# Client tests: BATCHES batches of BATCH rows; max_grad_norm well below the gradients' norm
# (about 1-10 here), so gradfuse's clip is active.
BATCH, BATCHES = 4, 12
CLIENT_OPT = dict(lr=0.1, momentum=0.9, weight_decay=0.01, max_grad_norm=0.5)


def make_model(seed, dtype, device):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 3)).to(device=device, dtype=dtype)


def batches(seed, n, dtype, device):
    gen = generator(seed)
    return [(randn((5, 6), dtype, device, gen), randn((5, 3), dtype, device, gen)) for _ in range(n)]


def make_client_problem(gen):
    """A tiny float64 MLP with random weights and BATCHES random regression batches."""
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    x = torch.randn(BATCH * BATCHES, 4, generator=gen, dtype=F64)
    y = torch.randn(BATCH * BATCHES, 1, generator=gen, dtype=F64)
    return net, (x, y)
