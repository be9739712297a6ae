"""Test data: the devices to run on, seeded random tensors (never all zeros) and shapes."""
import zlib

import pytest
import torch

import gradfuse

# CPU always; CUDA too when the machine has one and gradfuse was built with it.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and gradfuse.cuda_compiled else [])

# CUDA-only tests skip cleanly on a machine without CUDA (or a CPU-only build).
requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and gradfuse.cuda_compiled),
                                   reason="needs a CUDA device and a CUDA build of gradfuse")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF_DTYPES = [torch.float16, torch.bfloat16]

# Edge sizes: empty, 0-dim, 1 element, odd sizes and sizes crossing the 16384-element CPU chunks.
EDGE_SHAPES = [(0,), (), (1,), (7,), (33,), (3, 11), (1023,), (16385,), (65537,)]
SMALL_SHAPES = [(0,), (), (1,), (7,), (2, 3), (33,)]


def seed_of(text):
    # A stable seed from a test's node id (reproducible, different per test).
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def generator(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(shape, dtype, device, gen, scale=1.0):
    """Random normal values with no exact zeros (a zero would hide sign and scale bugs)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    x = torch.where(x == 0, torch.full_like(x, 0.5 * scale), x)
    return x.to(dtype).to(device)


def many_shapes(gen, count, max_numel=50):
    # Many small tensors of random 0..3-d shapes (lists of 100s of tensors exercise the op loops).
    shapes = []
    for _ in range(count):
        ndim = int(torch.randint(0, 4, (1,), generator=gen))
        shapes.append(tuple(int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(ndim)))
    return [s for s in shapes if torch.Size(s).numel() <= max_numel]


def inject(t, value, gen):
    """Writes value (nan/inf) at a random position of t in place; returns the flat index."""
    flat = t.view(-1)
    index = int(torch.randint(0, flat.numel(), (1,), generator=gen))
    flat[index] = value
    return index
