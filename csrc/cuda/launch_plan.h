// How the multi-tensor launcher splits a tensor list: into launches (parameter tables of two
// capacity tiers), chunks of units (fixed by the sizes), per-block shares of chunks, element
// segments, and each segment's scalar prologue / vector packs / scalar tail. Plain C++ shared by
// the kernels and a host binding, so the split is tested on machines without a GPU.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>
#include <vector>

namespace gradfuse::cuda {

// Work-balancing granularity; every tensor starts on a unit, so unit offsets are pack aligned.
constexpr int64_t kUnitElements = 1024;
// Norm partials come per chunk of units, sized from the tensor sizes alone (never from the
// GPU's SM count or occupancy, so the norm's bits are the same on every GPU): at most
// kNormChunksWanted chunks, so the one-block merge of the partials costs the same for any model
// size (chunks grow instead), and as many for small lists, to fill every SM (shares of 3-4
// chunks per block on 1056 resident blocks balance within a few percent).
constexpr int64_t kNormChunksWanted = 4096;
// CUDA 12.1+ accepts this many bytes of kernel parameters on sm_70 and newer.
constexpr int kMaxParamBytes = 32764;
// The small tier's parameter bytes (the classic 4 KB limit): a launch of a few tensors copies
// this much instead of the full table.
constexpr int kSmallParamBytes = 4096;
// Kept free for the op's own parameters (scalars and pointers) next to the table.
constexpr int kOpParamBytes = 256;

// Tensors a table of param_bytes holds: per tensor depth pointers, a size and a unit offset.
constexpr int table_capacity(int depth, int param_bytes = kMaxParamBytes) {
  return (param_bytes - kOpParamBytes - 16) / (8 * depth + 8 + 4) - 1;
}

// Whether a launch of `tensors` tensors uses the small table tier.
constexpr bool uses_small_table(int64_t tensors, int depth) {
  return tensors <= table_capacity(depth, kSmallParamBytes);
}

C10_HOST_DEVICE inline int64_t units_of(int64_t numel) {
  return (numel + kUnitElements - 1) / kUnitElements;
}

// Units per norm chunk for a list of tensor sizes (see kNormChunksWanted).
inline int64_t norm_chunk_units(const std::vector<int64_t>& numels) {
  int64_t units = 0;
  for (const int64_t numel : numels) {
    units += units_of(numel);
  }
  const int64_t wanted = (units + kNormChunksWanted - 1) / kNormChunksWanted;
  return wanted < 1 ? 1 : wanted;
}

// Index t of the tensor whose units [unit_begin[t], unit_begin[t + 1]) hold unit.
C10_HOST_DEVICE inline int find_tensor(const int32_t* unit_begin, int num_tensors, int32_t unit) {
  int lo = 0;
  int hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (unit_begin[mid] <= unit) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Calls segment(t, begin, count) for the elements that units [lo, hi) of a launch cover.
template <typename Segment>
C10_HOST_DEVICE inline void for_each_segment(const int32_t* unit_begin, const int64_t* numel, int num_tensors,
                                             int64_t lo, int64_t hi, const Segment& segment) {
  for (int t = find_tensor(unit_begin, num_tensors, static_cast<int32_t>(lo)); t < num_tensors && unit_begin[t] < hi;
       ++t) {
    const int64_t first = unit_begin[t];
    const int64_t begin = (lo > first ? lo - first : 0) * kUnitElements;
    const int64_t end = (hi - first) * kUnitElements;
    const int64_t stop = end < numel[t] ? end : numel[t];
    segment(t, begin, stop - begin);
  }
}

// Chunks [begin, end) of block `block` (of `grid`): contiguous, equal shares (balanced).
struct ChunkShare {
  int64_t begin;
  int64_t end;
};
C10_HOST_DEVICE inline ChunkShare block_chunks(int64_t units, int64_t chunk_units, int64_t block, int64_t grid) {
  const int64_t chunks = (units + chunk_units - 1) / chunk_units;
  return ChunkShare{chunks * block / grid, chunks * (block + 1) / grid};
}

// Calls segment(t, begin, count) for every element of block `block`'s share, in one sweep.
template <typename Segment>
C10_HOST_DEVICE inline void for_each_block_segment(const int32_t* unit_begin, const int64_t* numel, int num_tensors,
                                                   int64_t chunk_units, int64_t block, int64_t grid,
                                                   const Segment& segment) {
  const int64_t units = unit_begin[num_tensors];
  const ChunkShare share = block_chunks(units, chunk_units, block, grid);
  const int64_t hi = share.end * chunk_units;
  for_each_segment(unit_begin, numel, num_tensors, share.begin * chunk_units, hi < units ? hi : units, segment);
}

// Like for_each_block_segment, chunk by chunk, calling chunk_done(chunk) after each chunk's
// segments. What a chunk covers depends on the sizes only, never on the grid: per-chunk norm
// partials are the same on every GPU.
template <typename Segment, typename ChunkDone>
C10_HOST_DEVICE inline void for_each_chunk(const int32_t* unit_begin, const int64_t* numel, int num_tensors,
                                           int64_t chunk_units, int64_t block, int64_t grid, const Segment& segment,
                                           const ChunkDone& chunk_done) {
  const int64_t units = unit_begin[num_tensors];
  const ChunkShare share = block_chunks(units, chunk_units, block, grid);
  for (int64_t chunk = share.begin; chunk < share.end; ++chunk) {
    const int64_t lo = chunk * chunk_units;
    const int64_t hi = lo + chunk_units < units ? lo + chunk_units : units;
    for_each_segment(unit_begin, numel, num_tensors, lo, hi, segment);
    chunk_done(chunk);
  }
}

// One launch: the list indices of its tensors, their units and chunks, and its grid.
struct LaunchGroup {
  std::vector<int64_t> tensors;
  int64_t units = 0;
  int64_t chunks = 0;
  int grid = 0;
};

// Splits a list of tensor sizes into launches of at most `capacity` non-empty tensors (and
// fewer than 2^31 units), each with min(chunks, resident_blocks) blocks.
inline std::vector<LaunchGroup> plan_launches(const std::vector<int64_t>& numels, int capacity,
                                              int64_t resident_blocks, int64_t chunk_units) {
  std::vector<LaunchGroup> groups;
  LaunchGroup group;
  auto close_group = [&] {
    if (!group.tensors.empty()) {
      group.chunks = (group.units + chunk_units - 1) / chunk_units;
      group.grid = static_cast<int>(group.chunks < resident_blocks ? group.chunks : resident_blocks);
      groups.push_back(std::move(group));
      group = LaunchGroup();
    }
  };
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] == 0) {
      continue;  // nothing to sweep
    }
    const int64_t units = units_of(numels[i]);
    TORCH_CHECK(units < INT32_MAX, "gradfuse: tensor ", i, " is too large (", numels[i], " elements)");
    if (static_cast<int>(group.tensors.size()) == capacity || group.units + units > INT32_MAX) {
      close_group();
    }
    group.tensors.push_back(static_cast<int64_t>(i));
    group.units += units;
  }
  close_group();
  return groups;
}

// Fills a launch's size and unit-offset columns (unit_begin has tensors.size() + 1 entries).
inline void fill_table_sizes(const LaunchGroup& group, const std::vector<int64_t>& numels, int64_t* numel,
                             int32_t* unit_begin) {
  int32_t units = 0;
  for (size_t slot = 0; slot < group.tensors.size(); ++slot) {
    numel[slot] = numels[group.tensors[slot]];
    unit_begin[slot] = units;
    units += static_cast<int32_t>(units_of(numel[slot]));
  }
  unit_begin[group.tensors.size()] = units;
}

// Element indices e where W-element packs are aligned in every list: e = residue (mod period);
// period 0 when no index is (lists misaligned against each other). Start from {0, 1}.
struct PackAlignment {
  int64_t residue;
  int64_t period;
};

// Adds one list (element address, element bytes) to the alignment of packs of `width` elements:
// a pack of that list is read as min(width * bytes, 16)-byte aligned vectors.
C10_HOST_DEVICE inline PackAlignment add_list_alignment(PackAlignment so_far, uint64_t address, int64_t element_bytes,
                                                        int64_t width) {
  const int64_t pack_bytes = width * element_bytes;
  const int64_t align = pack_bytes < 16 ? pack_bytes : 16;
  if (so_far.period == 0 || address % static_cast<uint64_t>(element_bytes) != 0) {
    return PackAlignment{0, 0};
  }
  const int64_t period = align / element_bytes;  // a power of two dividing width
  const int64_t residue = static_cast<int64_t>((align - address % static_cast<uint64_t>(align)) % align) / element_bytes;
  // Both periods are powers of two: the conditions agree iff they agree modulo the smaller one.
  const int64_t common = period < so_far.period ? period : so_far.period;
  if (residue % common != so_far.residue % common) {
    return PackAlignment{0, 0};
  }
  return period > so_far.period ? PackAlignment{residue, period} : so_far;
}

// A segment of n elements: scalar prologue (up to the first aligned pack, or everything when no
// pack can be aligned), whole packs of width elements, scalar tail.
struct PackSplit {
  int64_t prologue;
  int64_t packs;
  int64_t tail;
};
C10_HOST_DEVICE inline PackSplit split_for_packs(int64_t n, const PackAlignment& alignment, int64_t width) {
  if (alignment.period == 0) {
    return PackSplit{n, 0, 0};
  }
  const int64_t prologue = alignment.residue < n ? alignment.residue : n;
  const int64_t packs = (n - prologue) / width;
  return PackSplit{prologue, packs, n - prologue - packs * width};
}

}  // namespace gradfuse::cuda
