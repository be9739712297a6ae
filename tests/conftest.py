"""Fixtures: every test taking `device` runs on CPU and, where available, CUDA; `gen` is a
torch.Generator seeded from the test id so each test sees its own reproducible data."""
import os

import pytest
import torch

from data import DEVICES, generator, seed_of
from gradfuse import resident_store

# GRADFUSE_TEST_RESIDENT_MIN_ELEMENTS=0: the whole suite with every eligible running sum kept in .grad
# (by default only tensors of 64K elements and more, which few tests build).
if "GRADFUSE_TEST_RESIDENT_MIN_ELEMENTS" in os.environ:
    resident_store.RESIDENT_MIN_ELEMENTS = int(os.environ["GRADFUSE_TEST_RESIDENT_MIN_ELEMENTS"])


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

