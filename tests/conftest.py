"""Fixtures: every test taking `device` runs on CPU and, where available, CUDA; `gen` is a
torch.Generator seeded from the test id so each test sees its own reproducible data."""
import pytest
import torch

from data import DEVICES, generator, seed_of


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def seed(request):
    return seed_of(request.node.nodeid)


@pytest.fixture
def gen(seed):
    return generator(seed)


@pytest.fixture(autouse=True)
def _restore_threads():
    # Tests that change torch's thread count must not leak it into others.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

