"""The CUDA launcher's work split, checked on the host (csrc/cuda/launch_plan.h is plain C++
shared by the kernels): every element swept exactly once, in balanced, unit-aligned shares;
norm chunks fixed by the sizes alone (the same partials on every GPU); and a launch count
that grows with the table capacity, not with the number of tensors."""
import math
import random

import pytest

from gradfuse import _C

UNIT = _C.launch_unit_elements
NORM_CHUNK = 16  # the most units per norm chunk (csrc/cuda/launch_plan.h)
CAPACITY = {1: 1623, 2: 1159, 4: 737}  # tensors per 32 KB parameter table, by pointer lists
H100_RESIDENT = 132 * 8  # SMs x resident blocks of 256 threads


def gpt2_small_numels():
    """The 148 parameter sizes of GPT-2 small (embeddings, 12 blocks, final layer norm)."""
    block = [768, 768, 768 * 2304, 2304, 768 * 768, 768, 768, 768, 768 * 3072, 3072, 3072 * 768, 768]
    return [50257 * 768, 1024 * 768] + block * 12 + [768, 768]


def check_plan(numels, depth, resident, chunk_units=1):
    """Checks one plan's invariants and returns it."""
    plan = _C.launch_plan(numels, depth, resident, chunk_units)
    covered = {i: [] for i, n in enumerate(numels) if n > 0}
    for launch in plan:
        assert 1 <= len(launch["tensors"]) <= CAPACITY[depth]
        assert all(numels[i] > 0 for i in launch["tensors"]), "empty tensors take no table slot"
        units = sum(math.ceil(numels[i] / UNIT) for i in launch["tensors"])
        assert launch["chunks"] == math.ceil(units / chunk_units)
        assert launch["grid"] == min(launch["chunks"], resident)
        assert len(launch["blocks"]) == launch["grid"]
        shares, next_chunk = [], 0
        for block in launch["blocks"]:
            assert block["segments"], "every block gets work"
            share = 0
            for index, begin, count in block["segments"]:
                assert index in launch["tensors"]
                assert begin % UNIT == 0, "segments start on a unit, so vector packs stay aligned"
                assert 0 < count and begin + count <= numels[index]
                covered[index].append((begin, count))
                share += math.ceil(count / UNIT)
            shares.append(share)
            # Chunk by chunk, the block sweeps the same elements, in consecutive chunks.
            pieces = []
            for chunk, segments in block["chunks"]:
                assert chunk == next_chunk, "each chunk belongs to exactly one block, in order"
                next_chunk += 1
                pieces += segments
            assert merged(pieces) == merged(block["segments"])
        assert next_chunk == launch["chunks"]
        assert max(shares) - min(shares) <= chunk_units, "equal shares of chunks"
    for index, pieces in covered.items():
        pieces.sort()
        position = 0
        for begin, count in pieces:
            assert begin == position, f"tensor {index}: gap or overlap at element {position}"
            position += count
        assert position == numels[index], f"tensor {index}: {position} of {numels[index]} elements swept"
    return plan


def merged(segments):
    """Segments with adjacent pieces of one tensor joined."""
    out = []
    for index, begin, count in segments:
        if out and out[-1][0] == index and out[-1][1] + out[-1][2] == begin:
            out[-1] = (index, out[-1][1], out[-1][2] + count)
        else:
            out.append((index, begin, count))
    return out


def chunk_contents(plan):
    """chunk (launch, index) -> the segments it covers."""
    return {(n, chunk): segments for n, launch in enumerate(plan) for block in launch["blocks"]
            for chunk, segments in block["chunks"]}


def test_capacity_matches_the_kernel_tables():
    # The capacities the docs and launch-count tests rely on (static_assert keeps them in 32 KB).
    for depth, capacity in CAPACITY.items():
        numels = [1] * (capacity + 1)
        plan = check_plan(numels, depth, H100_RESIDENT)
        assert [len(launch["tensors"]) for launch in plan] == [capacity, 1]


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("resident", [1, 3, 7, H100_RESIDENT])
@pytest.mark.parametrize("chunk_units", [1, 3, NORM_CHUNK])
def test_edge_sizes_are_covered_exactly_once(depth, resident, chunk_units):
    numels = [0, 1, 3, UNIT - 1, UNIT, UNIT + 1, 0, 7 * UNIT + 5, 33, 2 * UNIT, 0, 40 * UNIT + 1]
    check_plan(numels, depth, resident, chunk_units)


@pytest.mark.parametrize("seed", range(6))
def test_random_lists_are_covered_exactly_once(seed):
    rng = random.Random(seed)
    count = rng.choice([1, 2, 17, 300, 1200])
    numels = [rng.choice([0, 1, rng.randrange(1, 5000), rng.randrange(1, 300_000)]) for _ in range(count)]
    depth = rng.choice([1, 2, 4])
    check_plan(numels, depth, rng.choice([1, 5, 64, H100_RESIDENT]), rng.choice([1, NORM_CHUNK]))


@pytest.mark.parametrize("seed", range(3))
def test_norm_chunks_do_not_depend_on_the_gpu(seed):
    # One norm partial per chunk, and a chunk's elements are fixed by the sizes alone: any SM
    # count or occupancy (H100 SXM 132 SMs, PCIe 114, a MIG slice) gives the same partials.
    rng = random.Random(seed)
    numels = [rng.choice([1, rng.randrange(1, 5000), rng.randrange(1, 3_000_000)]) for _ in range(rng.choice([3, 400]))]
    chunk_units = _C.norm_chunk_units(numels)
    plans = [check_plan(numels, 2, resident, chunk_units) for resident in (1, 7, 114 * 8, H100_RESIDENT, 10**6)]
    first = chunk_contents(plans[0])
    for plan in plans[1:]:
        assert chunk_contents(plan) == first


def test_norm_chunk_size_follows_the_list_size():
    # Enough chunks to fill a GPU for small lists, at most 16 units each so the partials' merge
    # stays short for big ones.
    def units(numels):
        return sum(math.ceil(n / UNIT) for n in numels)
    tiny = [1 + i % 512 for i in range(2000)]
    assert _C.norm_chunk_units(tiny) == 1
    assert _C.norm_chunk_units(gpt2_small_numels()) == NORM_CHUNK
    assert _C.norm_chunk_units([]) == 1
    for numels in (tiny, gpt2_small_numels(), [3000 * UNIT], [2048 * UNIT + 1]):
        chunk_units = _C.norm_chunk_units(numels)
        assert 1 <= chunk_units <= NORM_CHUNK
        chunks = math.ceil(units(numels) / chunk_units)
        assert chunks >= min(units(numels), 1024) or chunk_units == NORM_CHUNK  # >= half the 2048 wanted


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
    for chunk_units in (1, NORM_CHUNK):
        plan = check_plan([50257 * 768], 4, H100_RESIDENT, chunk_units)
        assert plan[0]["grid"] == H100_RESIDENT


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="depth"):
        _C.launch_plan([1], 5, 1)
    with pytest.raises(ValueError, match="resident_blocks"):
        _C.launch_plan([1], 1, 0)
    with pytest.raises(ValueError, match="chunk_units"):
        _C.launch_plan([1], 1, 1, 0)
