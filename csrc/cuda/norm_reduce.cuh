// Norm pieces shared by the kernels that produce a global norm: a per-thread accumulator in
// double (fed per pack in float for fp16/bf16), a fixed-order block merge, and the one-block
// merge of per-chunk partials.
#pragma once

#include "../element_math.h"
#include "multi_tensor_apply.cuh"

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <type_traits>

namespace gradfuse::cuda {

// Running norm of one thread's values, in double so squares of 1e30 floats do not overflow.
template <bool kInfNorm>
struct ThreadNorm {
  double value = 0.0;
  __device__ __forceinline__ void add(double x) { value = norm_combine(value, x, kInfNorm); }
};

// A pack's squares summed in float are used when the sum lies in [2^-64, FLT_MAX]: then no
// square overflowed, and squares that underflowed (each off by < 2^-126, flushed or not) are
// below 2^-59 of the sum. Otherwise (inf, NaN, tiny values) the pack goes through double.
constexpr float kMinFloatPackSum = 5.42101086242752217e-20f;  // 2^-64

template <typename T>
constexpr bool kIsHalfType = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// Adds W stored values to a thread's norm. fp16/bf16 packs of 8 are squared and summed in
// float, then widened once (one float64 add per 8 values instead of a conversion, multiply and
// add per value). A square has at most 22 (fp16) or 16 (bf16) significant bits, within float's
// 24, so it is exact unless it over- or underflows (bf16 only; guarded above). The pairwise sum
// of 8 rounds 3 times: a pack sum is within 3 * 2^-24 relative of the exact one, so the 2-norm
// is within about 1e-7 relative of the float64 sum the CPU forms (not bit-identical to it).
// The inf-norm's max of |x| is exact in float: the same bits either way.
template <bool kInfNorm, typename T, int W>
__device__ __forceinline__ void add_values(ThreadNorm<kInfNorm>& norm, const T (&values)[W]) {
  using math_t = at::opmath_type<T>;
  if constexpr (kIsHalfType<T> && W == 8) {
    float x[W];
#pragma unroll
    for (int j = 0; j < W; ++j) {
      x[j] = static_cast<float>(values[j]);
    }
    if constexpr (kInfNorm) {
      float m = fabsf(x[0]);
#pragma unroll
      for (int j = 1; j < W; ++j) {
        const float a = fabsf(x[j]);
        m = (a > m || a != a) ? a : m;  // NaN wins, as in norm_combine
      }
      norm.add(static_cast<double>(m));
    } else {
      const float s01 = __fadd_rn(__fmul_rn(x[0], x[0]), __fmul_rn(x[1], x[1]));
      const float s23 = __fadd_rn(__fmul_rn(x[2], x[2]), __fmul_rn(x[3], x[3]));
      const float s45 = __fadd_rn(__fmul_rn(x[4], x[4]), __fmul_rn(x[5], x[5]));
      const float s67 = __fadd_rn(__fmul_rn(x[6], x[6]), __fmul_rn(x[7], x[7]));
      const float sum = __fadd_rn(__fadd_rn(s01, s23), __fadd_rn(s45, s67));
      if (sum >= kMinFloatPackSum && sum <= FLT_MAX) {
        norm.value += static_cast<double>(sum);
        return;
      }
      uint32_t bits = 0;  // magnitude bits of the whole pack: 0 when every value is +-0
#pragma unroll
      for (int j = 0; j < W; ++j) {
        bits |= __float_as_uint(x[j]) << 1;
      }
      if (bits != 0) {  // an all-zero pack adds +0: nothing to do
#pragma unroll
        for (int j = 0; j < W; ++j) {
          norm.add(static_cast<double>(x[j]));
        }
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < W; ++j) {
      norm.add(static_cast<double>(static_cast<math_t>(values[j])));
    }
  }
}

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
