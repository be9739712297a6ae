"""The CUDA launcher's work split, checked on the host (csrc/cuda/launch_plan.h is plain C++
shared by the kernels): every element swept exactly once, in balanced, unit-aligned shares;
norm chunks fixed by the sizes alone (the same partials on every GPU) and bounded in number for
any model size; a launch count that grows with the table capacity, not with the number of
tensors; the small parameter-table tier for short lists; and each segment's scalar prologue,
aligned vector packs and scalar tail."""
import math
import random

import pytest

from gradfuse import _C

UNIT = _C.launch_unit_elements
NORM_CHUNKS = _C.norm_chunks_wanted  # the most norm partials per launch list (csrc/cuda/launch_plan.h)
CAPACITY = {1: 1623, 2: 1159, 4: 737}  # tensors per 32 KB parameter table, by pointer lists
SMALL_CAPACITY = {1: 190, 2: 135, 4: 85}  # tensors per 4 KB table (the small tier)
H100_RESIDENT = 132 * 8  # SMs x resident blocks of 256 threads


def gpt2_small_numels():
    """The 148 parameter sizes of GPT-2 small (embeddings, 12 blocks, final layer norm)."""
    block = [768, 768, 768 * 2304, 2304, 768 * 768, 768, 768, 768, 768 * 3072, 3072, 3072 * 768, 768]
    return [50257 * 768, 1024 * 768] + block * 12 + [768, 768]


def llama_numels(d, layers, ffn, vocab, kv):
    """Parameter sizes of a Llama-style model (untied embeddings, grouped KV heads of width kv)."""
    block = [d * d, kv * d, kv * d, d * d, ffn * d, ffn * d, d * ffn, d, d]
    return [vocab * d] + block * layers + [d, vocab * d]


def check_plan(numels, depth, resident, chunk_units=1):
    """Checks one plan's invariants and returns it."""
    plan = _C.launch_plan(numels, depth, resident, chunk_units)
    covered = {i: [] for i, n in enumerate(numels) if n > 0}
    for launch in plan:
        assert 1 <= len(launch["tensors"]) <= CAPACITY[depth]
        small = len(launch["tensors"]) <= SMALL_CAPACITY[depth]
        assert launch["table_capacity"] == (SMALL_CAPACITY if small else CAPACITY)[depth]
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
@pytest.mark.parametrize("chunk_units", [1, 3, 16, 61])
def test_edge_sizes_are_covered_exactly_once(depth, resident, chunk_units):
    numels = [0, 1, 3, UNIT - 1, UNIT, UNIT + 1, 0, 7 * UNIT + 5, 33, 2 * UNIT, 0, 40 * UNIT + 1]
    check_plan(numels, depth, resident, chunk_units)


@pytest.mark.parametrize("seed", range(6))
def test_random_lists_are_covered_exactly_once(seed):
    rng = random.Random(seed)
    count = rng.choice([1, 2, 17, 300, 1200])
    numels = [rng.choice([0, 1, rng.randrange(1, 5000), rng.randrange(1, 300_000)]) for _ in range(count)]
    depth = rng.choice([1, 2, 4])
    check_plan(numels, depth, rng.choice([1, 5, 64, H100_RESIDENT]), rng.choice([1, 16, _C.norm_chunk_units(numels)]))


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


def units_of(numels):
    return sum(math.ceil(n / UNIT) for n in numels)


def test_norm_chunk_size_follows_the_list_size():
    # Small lists: one unit per chunk, enough chunks to fill a GPU; larger lists: about
    # NORM_CHUNKS chunks, so there are never more partials to merge than that.
    tiny = [1 + i % 512 for i in range(2000)]
    assert _C.norm_chunk_units(tiny) == 1
    assert _C.norm_chunk_units([]) == 1
    assert _C.norm_chunk_units([NORM_CHUNKS * UNIT]) == 1
    assert _C.norm_chunk_units([NORM_CHUNKS * UNIT + 1]) == 2
    for numels in (tiny, gpt2_small_numels(), [3000 * UNIT], [2048 * UNIT + 1], llama_numels(4096, 32, 11008, 32000, 4096)):
        chunk_units = _C.norm_chunk_units(numels)
        chunks = math.ceil(units_of(numels) / chunk_units)
        assert chunks <= NORM_CHUNKS
        assert chunks >= min(units_of(numels), NORM_CHUNKS // 2)


@pytest.mark.parametrize("name,numels", [
    ("gpt2-small", gpt2_small_numels()),
    ("llama-7b", llama_numels(4096, 32, 11008, 32000, 4096)),
    ("llama-70b", llama_numels(8192, 80, 28672, 32000, 1024)),
    ("2000 tiny + one 2^31", [1 + i % 300 for i in range(2000)] + [2**31 + 4099]),
])
def test_norm_partials_stay_bounded_for_any_model_size(name, numels):
    # The one-block merge reads one partial per chunk: at most NORM_CHUNKS plus one per extra
    # launch (a launch's last chunk may be short), whatever the model size. (With chunks capped
    # at 16 units, Llama-7B gave ~420K partials.)
    chunk_units = _C.norm_chunk_units(numels)
    plan = _C.launch_plan(numels, 2, H100_RESIDENT, chunk_units)
    partials = sum(launch["chunks"] for launch in plan)
    assert partials <= NORM_CHUNKS + len(plan) - 1, f"{name}: {partials} partials"
    if name == "llama-7b":
        assert units_of(numels) // 16 > 400_000 and chunk_units > 1000


def test_short_lists_use_the_small_parameter_table():
    # A launch copies its whole parameter table: 4 KB for up to SMALL_CAPACITY tensors, not 32 KB.
    for depth in (1, 2, 4):
        assert [launch["table_capacity"] for launch in check_plan([1000] * 6, depth, H100_RESIDENT)] == [SMALL_CAPACITY[depth]]
        edge = check_plan([7] * SMALL_CAPACITY[depth], depth, H100_RESIDENT)
        assert [launch["table_capacity"] for launch in edge] == [SMALL_CAPACITY[depth]]
        over = check_plan([7] * (SMALL_CAPACITY[depth] + 1), depth, H100_RESIDENT)
        assert [launch["table_capacity"] for launch in over] == [CAPACITY[depth]]
    # 2000 tensors, 2 lists: one full table and the remaining 841 in another full one.
    plan = check_plan([1 + i % 64 for i in range(2000)], 2, H100_RESIDENT)
    assert [launch["table_capacity"] for launch in plan] == [CAPACITY[2], CAPACITY[2]]


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
    for chunk_units in (1, _C.norm_chunk_units([50257 * 768])):
        plan = check_plan([50257 * 768], 4, H100_RESIDENT, chunk_units)
        assert plan[0]["grid"] == H100_RESIDENT


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="depth"):
        _C.launch_plan([1], 5, 1)
    with pytest.raises(ValueError, match="resident_blocks"):
        _C.launch_plan([1], 1, 0)
    with pytest.raises(ValueError, match="chunk_units"):
        _C.launch_plan([1], 1, 1, 0)


# ------------------------------------------------------------------ vector packs within a segment
def aligned_at(lists, width, e):
    """Whether packs of `width` elements starting at element e are aligned in every list (a pack
    is read as min(width * bytes, 16)-byte vectors)."""
    return all((address + e * size) % min(width * size, 16) == 0 for address, size in lists)


def check_split(n, lists, width):
    prologue, packs, tail = _C.pack_split(n, lists, width)
    assert min(prologue, packs, tail) >= 0 and prologue + packs * width + tail == n
    first = next((e for e in range(width) if aligned_at(lists, width, e)), None)
    if first is None:
        assert (prologue, packs, tail) == (n, 0, 0), "lists misaligned against each other: all scalar"
    else:
        assert prologue == min(first, n), "the prologue stops at the first aligned pack"
        assert tail < width
        for i in range(min(packs, 4)):  # packs stay aligned: width is a multiple of every period
            assert aligned_at(lists, width, prologue + i * width)
    return prologue, packs, tail


# The ops' list combinations: (element bytes of each list, pack width).
OP_LISTS = [((4,), 4), ((2,), 8), ((8,), 2), ((4, 2), 8), ((4, 4), 4), ((2, 2), 8), ((2, 4, 2), 8), ((4, 4, 4), 4),
            ((8, 8, 8), 2), ((2, 2, 2), 8)]


@pytest.mark.parametrize("sizes,width", OP_LISTS)
def test_pack_split_matches_brute_force(sizes, width):
    rng = random.Random(f"{sizes}{width}")
    base = 1 << 20
    for _ in range(300):
        lists = [(base * rng.randrange(1, 64) + size * rng.randrange(0, 16), size) for size in sizes]
        check_split(rng.choice([0, 1, 5, 15, 16, 17, 1023, 1024, 4099]), lists, width)


def test_pack_split_cases():
    base = 1 << 20
    assert check_split(100, [(base, 4)], 4) == (0, 25, 0)
    # Every list one element past alignment (views x[1:] of aligned tensors): a 3-element prologue.
    assert check_split(100, [(base + 4, 4), (base + 4, 4), (base + 4, 4)], 4) == (3, 24, 1)
    # fp32 accumulator and bf16 gradient both at element 1: the bf16 list sets the prologue.
    assert check_split(100, [(base + 4, 4), (base + 2, 2)], 8) == (7, 11, 5)
    # An aligned accumulator with a gradient one element off: no common pack start.
    assert check_split(100, [(base, 4), (base + 4, 4)], 4) == (100, 0, 0)
    # A segment shorter than its prologue is all prologue.
    assert check_split(2, [(base + 4, 4)], 4) == (2, 0, 0)
    with pytest.raises(ValueError, match="width"):
        _C.pack_split(4, [(base, 4)], 3)
