// The one multi-tensor launcher of every CUDA op: a tensor list becomes a few launches whose
// kernel parameters carry the tensors' addresses and sizes (no host-to-device copy, graph
// capturable; a 4 KB table for a few tensors, 32 KB for many); each block sweeps an equal,
// contiguous share of the list's work units.
#pragma once

#include "cuda_device.h"
#include "launch_plan.h"
#include "vector_io.cuh"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace gradfuse::cuda {

constexpr int kBlockThreads = 256;  // 8 warps: enough for the shuffle reduction, many blocks per SM
constexpr int kWarps = kBlockThreads / 32;
// Packs in flight per thread and list (to cover DRAM latency): 4, or 2 for 8-element packs,
// whose half/bfloat16 conversions would otherwise cost occupancy.
template <int W>
constexpr int kIlp = W >= 8 ? 2 : 4;

// Kernel parameter table of one launch: kDepth pointer lists (list 0 gives the sizes).
template <int kDepth, int kTableCapacity>
struct TensorTable {
  static constexpr int kCapacity = kTableCapacity;
  void* ptrs[kDepth][kCapacity];
  int64_t numel[kCapacity];
  int32_t unit_begin[kCapacity + 1];  // prefix sum of ceil(numel / kUnitElements)
  int32_t num_tensors;
  int32_t chunk_units;  // the split's granularity (see for_each_chunk)
};
// The two capacity tiers: kernel parameters are copied whole at every launch.
template <int kDepth>
using SmallTable = TensorTable<kDepth, table_capacity(kDepth, kSmallParamBytes)>;
template <int kDepth>
using FullTable = TensorTable<kDepth, table_capacity(kDepth)>;

// Op interface: kChunkResults (whether the op ends each chunk with end_chunk(chunk), a
// block-wide step such as a norm partial's reduction; otherwise a block sweeps its share in one
// go), bool begin_block() (false: the block has nothing to do), segment(table, t, begin, n) for
// elements [begin, begin + n) of tensor t, end_block().
template <typename Table, typename Op>
__global__ void __launch_bounds__(kBlockThreads) multi_tensor_kernel(const __grid_constant__ Table table, Op op) {
  if (!op.begin_block()) {
    return;
  }
  const auto segment = [&](int t, int64_t begin, int64_t n) { op.segment(table, t, begin, n); };
  if constexpr (Op::kChunkResults) {
    for_each_chunk(table.unit_begin, table.numel, table.num_tensors, table.chunk_units, blockIdx.x, gridDim.x,
                   segment, [&](int64_t chunk) { op.end_chunk(chunk); });
  } else {
    for_each_block_segment(table.unit_begin, table.numel, table.num_tensors, table.chunk_units, blockIdx.x,
                           gridDim.x, segment);
  }
  op.end_block();
}

// Calls body.run<W>(elem, valid) for `count` packs of W elements starting at element `first`,
// kIlp<W> packs per thread and call so their loads are all in flight before any math.
template <int W, typename Body>
__device__ __forceinline__ void sweep_packs(int64_t first, int64_t count, Body& body) {
  for (int64_t p = threadIdx.x; p < count; p += kIlp<W> * kBlockThreads) {
    int64_t elem[kIlp<W>];
    bool valid[kIlp<W>];
#pragma unroll
    for (int k = 0; k < kIlp<W>; ++k) {
      const int64_t q = p + k * kBlockThreads;
      valid[k] = q < count;
      elem[k] = first + q * W;
    }
    body.template run<W>(elem, valid);
  }
}

// n elements: a scalar prologue up to the first pack aligned in every list, kWidth-element
// vector packs, a scalar tail (all scalar when the lists are misaligned against each other).
template <int kWidth, typename Body>
__device__ __forceinline__ void sweep_segment(int64_t n, const PackAlignment& alignment, Body& body) {
  const PackSplit split = split_for_packs(n, alignment, kWidth);
  if (split.prologue > 0) {
    sweep_packs<1>(0, split.prologue, body);
  }
  if (split.packs > 0) {
    sweep_packs<kWidth>(split.prologue, split.packs, body);
  }
  if (split.tail > 0) {
    sweep_packs<1>(split.prologue + split.packs * kWidth, split.tail, body);
  }
}

// Blocks of 256 threads of `kernel` resident on one SM. The query loads the kernel (lazy module
// loading), which a global-mode stream capture forbids: relaxed mode lets a kernel's first use
// be inside a CUDA-graph capture.
inline int query_resident_blocks(const void* kernel) {
  const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kBlockThreads, 0));
  return blocks > 0 ? blocks : 1;
}

// query_resident_blocks, cached per device and per Key (one Key type per kernel).
template <typename Key>
int cached_resident_blocks(int device, const void* kernel) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < static_cast<int>(cache.size())) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) {
      return known;
    }
  }
  const int blocks = query_resident_blocks(kernel);
  if (device >= 0 && device < static_cast<int>(cache.size())) {
    cache[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

// Blocks of an op's kernel that fit on one SM at once: the smaller of the two tiers (both are
// queried, so both are loaded before any capture can need them).
template <int kDepth, typename Op>
int resident_blocks_per_sm(int device) {
  const auto small = multi_tensor_kernel<SmallTable<kDepth>, Op>;
  const auto full = multi_tensor_kernel<FullTable<kDepth>, Op>;
  const int a = cached_resident_blocks<SmallTable<kDepth>(Op)>(device, reinterpret_cast<const void*>(small));
  const int b = cached_resident_blocks<FullTable<kDepth>(Op)>(device, reinterpret_cast<const void*>(full));
  return a < b ? a : b;
}

// Plans and issues the launches of one op over kDepth parallel tensor lists. Empty tensors are
// left out; a list longer than a table's capacity takes ceil(n / capacity) launches.
template <int kDepth, typename Op>
class MultiTensorLaunch {
  static_assert(sizeof(FullTable<kDepth>) + sizeof(Op) <= kMaxParamBytes, "kernel parameters too large");
  static_assert(sizeof(SmallTable<kDepth>) + sizeof(Op) <= kSmallParamBytes, "small-tier parameters too large");

 public:
  // written[d]: list d is modified (its pointers are taken as mutable).
  MultiTensorLaunch(const std::array<at::TensorList, kDepth>& lists, const std::array<bool, kDepth>& written,
                    int device)
      : lists_(lists), written_(written), numels_(lists[0].size()) {
    for (size_t i = 0; i < numels_.size(); ++i) {
      numels_[i] = lists[0][i].numel();
    }
    const int64_t resident = static_cast<int64_t>(multiprocessor_count(device)) *
                             resident_blocks_per_sm<kDepth, Op>(device);
    // Per-chunk results need chunks fixed by the sizes; otherwise units balance best.
    chunk_units_ = Op::kChunkResults ? norm_chunk_units(numels_) : 1;
    groups_ = plan_launches(numels_, FullTable<kDepth>::kCapacity, resident, chunk_units_);
    for (const LaunchGroup& group : groups_) {
      total_chunks_ += group.chunks;
    }
  }

  // Chunks over all launches (one norm partial slot each); 0 when every tensor is empty.
  int64_t total_chunks() const { return total_chunks_; }

  // Per-tensor piece slots over all launches (tensors + chunks of each; see tensor_pieces.cuh).
  int64_t total_pieces() const {
    int64_t pieces = 0;
    for (const LaunchGroup& group : groups_) {
      pieces += static_cast<int64_t>(group.tensors.size()) + group.chunks;
    }
    return pieces;
  }

  // make_op(first_chunk) (or make_op(first_chunk, first_piece)) builds the op of a launch whose
  // chunks are first_chunk, first_chunk + 1, ... and whose pieces start at first_piece.
  template <typename MakeOp>
  void launch(cudaStream_t stream, const MakeOp& make_op) const {
    std::unique_ptr<FullTable<kDepth>> full;  // 32 KB: off the host stack, not zero-filled
    int64_t first_chunk = 0;
    int64_t first_piece = 0;
    for (const LaunchGroup& group : groups_) {
      const auto op = [&] {
        if constexpr (std::is_invocable_v<MakeOp, int64_t, int64_t>) {
          return make_op(first_chunk, first_piece);
        } else {
          return make_op(first_chunk);
        }
      }();
      if (uses_small_table(static_cast<int64_t>(group.tensors.size()), kDepth)) {
        SmallTable<kDepth> table;
        issue(table, group, stream, op);
      } else {
        if (!full) {
          full.reset(new FullTable<kDepth>);
        }
        issue(*full, group, stream, op);
      }
      first_chunk += group.chunks;
      first_piece += static_cast<int64_t>(group.tensors.size()) + group.chunks;
    }
  }

  // Visits every launch as visit(group, first_piece, chunk_units, numels) (see tensor_pieces.cuh).
  template <typename Visit>
  void for_each_launch(const Visit& visit) const {
    int64_t first_piece = 0;
    for (const LaunchGroup& group : groups_) {
      visit(group, first_piece, chunk_units_, numels_);
      first_piece += static_cast<int64_t>(group.tensors.size()) + group.chunks;
    }
  }

 private:
  template <typename Table>
  void issue(Table& table, const LaunchGroup& group, cudaStream_t stream, const Op& op) const {
    for (size_t slot = 0; slot < group.tensors.size(); ++slot) {
      for (int d = 0; d < kDepth; ++d) {
        const at::Tensor& t = lists_[d][group.tensors[slot]];
        table.ptrs[d][slot] = written_[d] ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr());
      }
    }
    fill_table_sizes(group, numels_, table.numel, table.unit_begin);
    table.num_tensors = static_cast<int32_t>(group.tensors.size());
    table.chunk_units = static_cast<int32_t>(chunk_units_);
    multi_tensor_kernel<Table, Op><<<group.grid, kBlockThreads, 0, stream>>>(table, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  std::array<at::TensorList, kDepth> lists_;
  std::array<bool, kDepth> written_;
  std::vector<int64_t> numels_;
  std::vector<LaunchGroup> groups_;
  int64_t chunk_units_ = 1;
  int64_t total_chunks_ = 0;
};

}  // namespace gradfuse::cuda
