// accumulate_norm_ and finalize_norm_ on CUDA: per-chunk norm partials, merged on the device in
// a fixed order into norm_state; the finalized norm never leaves the device.
#include "../element_math.h"
#include "../op_checks.h"
#include "../ops.h"
#include "../static_switch.h"
#include "../tensor_checks.h"
#include "cuda_device.h"
#include "multi_tensor_apply.cuh"
#include "norm_reduce.cuh"
#include "tensor_pieces.cuh"
#include "vector_io.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace gradfuse::cuda {
namespace {

constexpr const char* kNormOp = "gradfuse::accumulate_norm_";
constexpr const char* kFinalizeOp = "gradfuse::finalize_norm_";

// Norm partial of the elements of one list (table list 0), one partial per chunk.
template <typename T, bool kInfNorm, bool kPerTensor>
struct NormOp {
  static constexpr int kWidth = pack_width<T>();
  static constexpr bool kChunkResults = true;  // one norm partial per chunk
  double* partials;
  int64_t first_chunk;
  double* pieces;  // kPerTensor: each (tensor, chunk) piece's own partial (tensor_pieces.cuh)
  int64_t first_piece;
  const T* data = nullptr;
  ThreadNorm<kInfNorm> norm;
  ThreadNorm<kInfNorm> piece;

  __device__ __forceinline__ bool begin_block() { return true; }

  template <typename Table>
  __device__ __forceinline__ void segment(const Table& table, int t, int64_t begin, int64_t n) {
    data = static_cast<const T*>(table.ptrs[0][t]) + begin;
    sweep_segment<kWidth>(n, pack_alignment<kWidth>(data), *this);
    if constexpr (kPerTensor) {  // every thread of the block reaches this (segments are block-uniform)
      store_chunk_partial<kInfNorm>(piece.value, pieces, first_piece + t + chunk_of_segment(table, t, begin));
      piece.value = 0.0;
    }
  }

  template <int W>
  __device__ __forceinline__ void run(const int64_t (&elem)[kIlp<W>], const bool (&valid)[kIlp<W>]) {
    Pack<T, W> x[kIlp<W>];
#pragma unroll
    for (int k = 0; k < kIlp<W>; ++k) {
      if (valid[k]) {
        x[k] = load_pack<W>(data + elem[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp<W>; ++k) {
      if (valid[k]) {
        add_values(norm, x[k].val);
        if constexpr (kPerTensor) {
          add_values(piece, x[k].val);
        }
      }
    }
  }

  __device__ __forceinline__ void end_chunk(int64_t chunk) {
    store_chunk_partial<kInfNorm>(norm.value, partials, first_chunk + chunk);
    norm.value = 0.0;
  }

  __device__ __forceinline__ void end_block() {}
};

template <bool kInfNorm>
__global__ void __launch_bounds__(kBlockThreads)
    merge_partials_kernel(const double* __restrict__ partials, int64_t count, double* __restrict__ state) {
  // Thread t merges partials t, t + 256, t + 512, ... in that order, eight loads in flight at a
  // time; a missing one reads as 0, which leaves either norm kind unchanged.
  constexpr int kInFlight = 8;
  double value = 0.0;
  for (int64_t base = threadIdx.x; base < count; base += kInFlight * kBlockThreads) {
    double loaded[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int64_t i = base + k * kBlockThreads;
      loaded[k] = i < count ? partials[i] : 0.0;
    }
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      value = norm_merge(value, loaded[k], kInfNorm);
    }
  }
  const double total = block_norm_merge<kInfNorm>(value);
  if (threadIdx.x == 0) {  // same merge as the CPU's merge_into_norm_state
    state[0] = norm_merge(state[0], total, kInfNorm);
    if (!is_finite(total)) {
      state[1] = 1.0;
    }
  }
}

__global__ void finalize_norm_kernel(double* __restrict__ state, int64_t* __restrict__ skipped_steps,
                                     double* __restrict__ result, bool inf_norm, double scale,
                                     bool count_nonfinite) {
  const double norm = norm_finalize(state[0], state[1] != 0.0, inf_norm, scale);
  state[0] = 0.0;  // ready for the next cycle without a separate zeroing pass
  state[1] = 0.0;
  if (count_nonfinite && !is_finite(norm)) {
    skipped_steps[0] += 1;
  }
  result[0] = norm;
}

}  // namespace

void merge_partials_into_state(const at::Tensor& partials, const at::Tensor& norm_state, bool inf_norm,
                               cudaStream_t stream) {
  GRADFUSE_BOOL_SWITCH(inf_norm, kInfNorm, [&] {
    const auto kernel = merge_partials_kernel<kInfNorm>;
    cached_resident_blocks<decltype(kernel)(std::bool_constant<kInfNorm>)>(  // loads it outside capture rules
        norm_state.device().index(), reinterpret_cast<const void*>(kernel));
    kernel<<<1, kBlockThreads, 0, stream>>>(
        partials.const_data_ptr<double>(), partials.numel(), norm_state.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void accumulate_norm_(const at::Tensor& norm_state, at::TensorList tensors, double norm_type,
                      const std::optional<at::Tensor>& tensor_norms) {

  const at::Device device = norm_state.device();
  check_cuda_device(kNormOp, "norm_state", device);
  check_norm_inputs(norm_state, tensors, norm_type, device);
  check_tensor_norms(kNormOp, tensor_norms, true, tensors.size(), device);
  if (tensors.empty()) {
    return;
  }
  const bool inf_norm = is_inf_norm(norm_type);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "gradfuse_norm_cuda", [&] {
    GRADFUSE_BOOL_SWITCH(inf_norm, kInfNorm, [&] {
      GRADFUSE_BOOL_SWITCH(tensor_norms.has_value(), kPerTensor, [&] {
        using Op = NormOp<scalar_t, kInfNorm, kPerTensor>;
        const MultiTensorLaunch<1, Op> launch({tensors}, {false}, device.index());
        if (launch.total_chunks() == 0) {
          return;  // only empty tensors: the CPU adds a zero partial, which changes nothing
        }
        const at::Tensor partials = at::empty({launch.total_chunks()}, norm_state.options());
        double* partials_ptr = partials.mutable_data_ptr<double>();
        at::Tensor pieces;
        double* pieces_ptr = nullptr;
        if constexpr (kPerTensor) {
          pieces = at::empty({launch.total_pieces()}, norm_state.options());
          pieces_ptr = pieces.mutable_data_ptr<double>();
        }
        launch.launch(stream, [&](int64_t first_chunk, int64_t first_piece) {
          return Op{partials_ptr, first_chunk, pieces_ptr, first_piece};
        });
        merge_partials_into_state(partials, norm_state, kInfNorm, stream);
        if constexpr (kPerTensor) {
          merge_tensor_pieces(launch, pieces, *tensor_norms, kInfNorm, stream);
        }
      });
    });
  });
}

at::Tensor finalize_norm_(const at::Tensor& norm_state, const at::Tensor& skipped_steps, double norm_type,
                          double scale, bool count_nonfinite) {
  const at::Device device = norm_state.device();
  check_cuda_device(kFinalizeOp, "norm_state", device);
  check_finalize_inputs(norm_state, skipped_steps, norm_type, device);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor result = at::empty({}, norm_state.options());
  cached_resident_blocks<decltype(finalize_norm_kernel)>(device.index(),  // loads it outside capture rules
                                                        reinterpret_cast<const void*>(finalize_norm_kernel));
  finalize_norm_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream(device.index()).stream()>>>(
      norm_state.mutable_data_ptr<double>(), skipped_steps.mutable_data_ptr<int64_t>(),
      result.mutable_data_ptr<double>(), is_inf_norm(norm_type), scale, count_nonfinite);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return result;
}

}  // namespace gradfuse::cuda
