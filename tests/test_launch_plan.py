"""The CUDA launcher's work split, checked on the host (csrc/cuda/launch_plan.h is plain C++
shared by the kernels): every element swept exactly once, in balanced, unit-aligned shares,
and a launch count that grows with the table capacity, not with the number of tensors."""
import math
import random

import pytest

from gradfuse import _C

UNIT = _C.launch_unit_elements
CAPACITY = {1: 1623, 2: 1159, 4: 737}  # tensors per 32 KB parameter table, by pointer lists
H100_RESIDENT = 132 * 8  # SMs x resident blocks of 256 threads


def gpt2_small_numels():
    """The 148 parameter sizes of GPT-2 small (embeddings, 12 blocks, final layer norm)."""
    block = [768, 768, 768 * 2304, 2304, 768 * 768, 768, 768, 768, 768 * 3072, 3072, 3072 * 768, 768]
    return [50257 * 768, 1024 * 768] + block * 12 + [768, 768]


def check_plan(numels, depth, resident):
    """Checks one plan's invariants and returns it."""
    plan = _C.launch_plan(numels, depth, resident)
    covered = {i: [] for i, n in enumerate(numels) if n > 0}
    for launch in plan:
        assert 1 <= len(launch["tensors"]) <= CAPACITY[depth]
        assert all(numels[i] > 0 for i in launch["tensors"]), "empty tensors take no table slot"
        units = sum(math.ceil(numels[i] / UNIT) for i in launch["tensors"])
        assert launch["grid"] == min(units, resident)
        assert len(launch["blocks"]) == launch["grid"]
        shares = []
        for segments in launch["blocks"]:
            assert segments, "every block gets work"
            share = 0
            for index, begin, count in segments:
                assert index in launch["tensors"]
                assert begin % UNIT == 0, "segments start on a unit, so vector packs stay aligned"
                assert 0 < count and begin + count <= numels[index]
                covered[index].append((begin, count))
                share += math.ceil(count / UNIT)
            shares.append(share)
        assert max(shares) - min(shares) <= 1, "equal unit shares"
    for index, pieces in covered.items():
        pieces.sort()
        position = 0
        for begin, count in pieces:
            assert begin == position, f"tensor {index}: gap or overlap at element {position}"
            position += count
        assert position == numels[index], f"tensor {index}: {position} of {numels[index]} elements swept"
    return plan


def test_capacity_matches_the_kernel_tables():
    # The capacities the docs and launch-count tests rely on (static_assert keeps them in 32 KB).
    for depth, capacity in CAPACITY.items():
        numels = [1] * (capacity + 1)
        plan = check_plan(numels, depth, H100_RESIDENT)
        assert [len(launch["tensors"]) for launch in plan] == [capacity, 1]


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("resident", [1, 3, 7, H100_RESIDENT])
def test_edge_sizes_are_covered_exactly_once(depth, resident):
    numels = [0, 1, 3, UNIT - 1, UNIT, UNIT + 1, 0, 7 * UNIT + 5, 33, 2 * UNIT, 0]
    check_plan(numels, depth, resident)


@pytest.mark.parametrize("seed", range(6))
def test_random_lists_are_covered_exactly_once(seed):
    rng = random.Random(seed)
    count = rng.choice([1, 2, 17, 300, 1200])
    numels = [rng.choice([0, 1, rng.randrange(1, 5000), rng.randrange(1, 300_000)]) for _ in range(count)]
    depth = rng.choice([1, 2, 4])
    check_plan(numels, depth, rng.choice([1, 5, 64, H100_RESIDENT]))


def test_only_empty_tensors_take_no_launch():
    assert _C.launch_plan([0, 0, 0], 2, H100_RESIDENT) == []
    assert _C.launch_plan([], 4, H100_RESIDENT) == []


def boundary_step_launches(numels):
    """Kernel launches of one boundary step with clipping and momentum: accumulate with the
    norm (2 lists) + partial merge + finalize + update (4 lists) + momentum flags (1 list)."""
    def launches(depth):
        return len(_C.launch_plan(numels, depth, H100_RESIDENT))
    return launches(2) + 1 + 1 + launches(4) + launches(1)


def test_launch_count_is_independent_of_tensor_count_for_gpt2_and_2000_tiny():
    # The bound: O(1) launches per (device, dtype) group, not O(tensors).
    assert len(gpt2_small_numels()) == 148
    assert boundary_step_launches(gpt2_small_numels()) == 5
    assert boundary_step_launches([1 + i % 64 for i in range(2000)]) == 2 + 1 + 1 + 3 + 2


def test_large_tensor_is_spread_over_every_resident_block():
    plan = check_plan([50257 * 768], 4, H100_RESIDENT)
    assert plan[0]["grid"] == H100_RESIDENT


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="depth"):
        _C.launch_plan([1], 5, 1)
    with pytest.raises(ValueError, match="resident_blocks"):
        _C.launch_plan([1], 1, 0)
