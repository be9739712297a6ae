// The one multi-tensor launcher of every CUDA op: a tensor list becomes a few launches whose
// kernel parameters carry the tensors' addresses and sizes (no host-to-device copy, graph
// capturable); each block sweeps an equal, contiguous share of the list's work units.
#pragma once

#include "cuda_device.h"
#include "launch_plan.h"
#include "vector_io.cuh"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace gradfuse::cuda {

constexpr int kBlockThreads = 256;  // 8 warps: enough for the shuffle reduction, many blocks per SM
constexpr int kWarps = kBlockThreads / 32;
// Packs in flight per thread and list (to cover DRAM latency): 4, or 2 for 8-element packs,
// whose half/bfloat16 conversions would otherwise cost occupancy.
template <int W>
constexpr int kIlp = W >= 8 ? 2 : 4;

// Kernel parameter table of one launch: kDepth pointer lists (list 0 gives the sizes).
template <int kDepth>
struct TensorTable {
  static constexpr int kCapacity = table_capacity(kDepth);
  void* ptrs[kDepth][kCapacity];
  int64_t numel[kCapacity];
  int32_t unit_begin[kCapacity + 1];  // prefix sum of ceil(numel / kUnitElements)
  int32_t num_tensors;
  int32_t chunk_units;  // the split's granularity (see for_each_chunk)
};

// Op interface: kChunkResults (whether the op ends each chunk with end_chunk(chunk), a
// block-wide step such as a norm partial's reduction; otherwise a block sweeps its share in one
// go), bool begin_block() (false: the block has nothing to do), segment(table, t, begin, n) for
// elements [begin, begin + n) of tensor t, end_block().
template <int kDepth, typename Op>
__global__ void __launch_bounds__(kBlockThreads)
    multi_tensor_kernel(const __grid_constant__ TensorTable<kDepth> table, Op op) {
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

// n elements: kWidth-element vector packs plus a scalar tail when aligned, scalars otherwise.
template <int kWidth, typename Body>
__device__ __forceinline__ void sweep_segment(int64_t n, bool vectorized, Body& body) {
  if (vectorized) {
    const int64_t packs = n / kWidth;
    sweep_packs<kWidth>(0, packs, body);
    if (packs * kWidth < n) {
      sweep_packs<1>(packs * kWidth, n - packs * kWidth, body);
    }
  } else {
    sweep_packs<1>(0, n, body);
  }
}

// Blocks of this kernel that fit on one SM at once (cached per device).
template <int kDepth, typename Op>
int resident_blocks_per_sm(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < static_cast<int>(cache.size())) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) {
      return known;
    }
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, multi_tensor_kernel<kDepth, Op>,
                                                               kBlockThreads, 0));
  blocks = blocks > 0 ? blocks : 1;
  if (device < static_cast<int>(cache.size())) {
    cache[device].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

// Plans and issues the launches of one op over kDepth parallel tensor lists. Empty tensors are
// left out; a list longer than a table's capacity takes ceil(n / capacity) launches.
template <int kDepth, typename Op>
class MultiTensorLaunch {
  static_assert(sizeof(TensorTable<kDepth>) + sizeof(Op) <= kMaxParamBytes, "kernel parameters too large");

 public:
  using Table = TensorTable<kDepth>;

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
    groups_ = plan_launches(numels_, Table::kCapacity, resident, chunk_units_);
    for (const LaunchGroup& group : groups_) {
      total_chunks_ += group.chunks;
    }
  }

  // Chunks over all launches (one norm partial slot each); 0 when every tensor is empty.
  int64_t total_chunks() const { return total_chunks_; }

  // make_op(first_chunk) builds the op of a launch whose chunks are first_chunk, first_chunk + 1, ...
  template <typename MakeOp>
  void launch(cudaStream_t stream, const MakeOp& make_op) const {
    auto table = std::make_unique<Table>();  // 32KB: kept off the host stack
    int64_t first_chunk = 0;
    for (const LaunchGroup& group : groups_) {
      for (size_t slot = 0; slot < group.tensors.size(); ++slot) {
        for (int d = 0; d < kDepth; ++d) {
          const at::Tensor& t = lists_[d][group.tensors[slot]];
          table->ptrs[d][slot] = written_[d] ? t.mutable_data_ptr() : const_cast<void*>(t.const_data_ptr());
        }
      }
      fill_table_sizes(group, numels_, table->numel, table->unit_begin);
      table->num_tensors = static_cast<int32_t>(group.tensors.size());
      table->chunk_units = static_cast<int32_t>(chunk_units_);
      multi_tensor_kernel<kDepth, Op><<<group.grid, kBlockThreads, 0, stream>>>(*table, make_op(first_chunk));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      first_chunk += group.chunks;
    }
  }

 private:
  std::array<at::TensorList, kDepth> lists_;
  std::array<bool, kDepth> written_;
  std::vector<int64_t> numels_;
  std::vector<LaunchGroup> groups_;
  int64_t chunk_units_ = 1;
  int64_t total_chunks_ = 0;
};

}  // namespace gradfuse::cuda
