// Norm pieces shared by the kernels that produce a global norm: a per-thread accumulator in
// double, a fixed-order block merge, and the one-block merge of per-chunk partials.
#pragma once

#include "../element_math.h"
#include "multi_tensor_apply.cuh"

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

namespace gradfuse::cuda {

// Running norm of one thread's values, in double so squares of 1e30 floats do not overflow.
template <bool kInfNorm>
struct ThreadNorm {
  double value = 0.0;
  __device__ __forceinline__ void add(double x) { value = norm_combine(value, x, kInfNorm); }
};

// Merge of one value per thread in a fixed shuffle tree (bitwise reproducible); valid in thread 0.
template <bool kInfNorm>
__device__ __forceinline__ double block_norm_merge(double value) {
  __shared__ double warp_totals[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value = norm_merge(value, __shfl_down_sync(0xffffffffu, value, offset), kInfNorm);
  }
  if (lane == 0) {
    warp_totals[warp] = value;
  }
  __syncthreads();
  if (warp == 0) {
    value = lane < kWarps ? warp_totals[lane] : 0.0;  // 0 is neutral for both norm kinds
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      value = norm_merge(value, __shfl_down_sync(0xffffffffu, value, offset), kInfNorm);
    }
  }
  __syncthreads();  // warp_totals is free again: the merge may run once per chunk
  return value;
}

// Writes the block-merged norm of one chunk into partials[slot] (every thread must call it).
template <bool kInfNorm>
__device__ __forceinline__ void store_chunk_partial(double thread_value, double* partials, int64_t slot) {
  const double total = block_norm_merge<kInfNorm>(thread_value);
  if (threadIdx.x == 0) {
    partials[slot] = total;
  }
}

// Merges partials (float64, one per chunk of the producing launches) in a fixed order into
// norm_state [value, non-finite flag] with one one-block kernel; no float atomics.
void merge_partials_into_state(const at::Tensor& partials, const at::Tensor& norm_state, bool inf_norm,
                               cudaStream_t stream);

}  // namespace gradfuse::cuda
