// Per-tensor norm partials on CUDA, from the pass that forms the global norm: each block merges the
// piece of a tensor it swept in a chunk into pieces[first_piece + slot + chunk] (unique, since the
// chunks cover a launch's tensors in order), then one small kernel per launch merges each tensor's
// pieces in chunk order into its entry of tensor_norms. Deterministic, no atomics, graph capturable
// (the merge takes its addresses as kernel parameters).
#pragma once

#include "../element_math.h"
#include "launch_plan.h"
#include "multi_tensor_apply.cuh"
#include "norm_reduce.cuh"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace gradfuse::cuda {

// The chunk (of its launch) that the segment of slot t starting at element `begin` lies in.
template <typename Table>
__device__ __forceinline__ int64_t chunk_of_segment(const Table& table, int t, int64_t begin) {
  return (static_cast<int64_t>(table.unit_begin[t]) + begin / kUnitElements) / table.chunk_units;
}

// The pieces of one launch and where each of its tensors' merged norm goes.
constexpr int kPieceMergeCapacity = 1624;  // >= every table tier's capacity (checked by the launcher)
struct PieceMerge {
  double* out[kPieceMergeCapacity];  // &tensor_norms[list index] of each slot
  int32_t unit_begin[kPieceMergeCapacity + 1];
  const double* pieces;
  int64_t first_piece;
  int32_t num_tensors;
  int32_t chunk_units;
};
static_assert(sizeof(PieceMerge) <= kMaxParamBytes, "piece merge parameters too large");

template <bool kInfNorm>
__global__ void merge_pieces_kernel(const __grid_constant__ PieceMerge merge) {
  const int slot = blockIdx.x * blockDim.x + threadIdx.x;
  if (slot >= merge.num_tensors) {
    return;
  }
  const int64_t first = merge.unit_begin[slot] / merge.chunk_units;
  const int64_t last = (merge.unit_begin[slot + 1] - 1) / merge.chunk_units;
  double total = 0.0;  // neutral for both norm kinds
  for (int64_t chunk = first; chunk <= last; ++chunk) {
    total = norm_merge(total, merge.pieces[merge.first_piece + slot + chunk], kInfNorm);
  }
  *merge.out[slot] = norm_merge(*merge.out[slot], total, kInfNorm);
}

// Merges the pieces a launcher's op wrote into tensor_norms (float64, one per list tensor): one
// small kernel per launch.
template <typename Launch>
void merge_tensor_pieces(const Launch& launch, const at::Tensor& pieces, const at::Tensor& tensor_norms,
                         bool inf_norm, cudaStream_t stream) {
  const auto kernel = inf_norm ? merge_pieces_kernel<true> : merge_pieces_kernel<false>;
  cached_resident_blocks<PieceMerge>(tensor_norms.device().index(),  // loads it outside capture rules
                                     reinterpret_cast<const void*>(merge_pieces_kernel<true>));
  cached_resident_blocks<PieceMerge(int)>(tensor_norms.device().index(),
                                          reinterpret_cast<const void*>(merge_pieces_kernel<false>));
  const auto merge = std::make_unique<PieceMerge>();  // 20 KB: off the host stack
  std::vector<int64_t> sizes;
  launch.for_each_launch([&](const LaunchGroup& group, int64_t first_piece, int64_t chunk_units,
                             const std::vector<int64_t>& numels) {
    TORCH_CHECK(static_cast<int64_t>(group.tensors.size()) <= kPieceMergeCapacity,
                "gradfuse: a launch of ", group.tensors.size(), " tensors exceeds the per-tensor norm merge");
    sizes.resize(group.tensors.size());
    fill_table_sizes(group, numels, sizes.data(), merge->unit_begin);
    for (size_t slot = 0; slot < group.tensors.size(); ++slot) {
      merge->out[slot] = tensor_norms.mutable_data_ptr<double>() + group.tensors[slot];
    }
    merge->pieces = pieces.const_data_ptr<double>();
    merge->first_piece = first_piece;
    merge->num_tensors = static_cast<int32_t>(group.tensors.size());
    merge->chunk_units = static_cast<int32_t>(chunk_units);
    constexpr int kThreads = 128;
    const int blocks = (merge->num_tensors + kThreads - 1) / kThreads;
    kernel<<<blocks, kThreads, 0, stream>>>(*merge);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gradfuse::cuda
