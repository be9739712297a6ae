// accumulate_ on CUDA: acc = (first ? 0 : acc) + scale * grad in one sweep, optionally adding
// the norm of the stored accumulators as per-chunk partials merged on the device.
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
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace gradfuse::cuda {
namespace {

constexpr const char* kAccumulateOp = "gradfuse::accumulate_";

// base + scale * grad, multiplied and added separately like the CPU's vector path (no FMA),
// so both backends round the accumulators identically.
__device__ __forceinline__ float add_scaled(float base, float scale, float grad) {
  return __fadd_rn(base, __fmul_rn(scale, grad));
}
__device__ __forceinline__ double add_scaled(double base, double scale, double grad) {
  return __dadd_rn(base, __dmul_rn(scale, grad));
}

template <typename acc_t, typename grad_t, bool kFirst, bool kWithNorm, bool kInfNorm, bool kPerTensor>
struct AccumulateOp {
  using math_t = at::opmath_type<acc_t>;
  static constexpr int kWidth = pack_width<acc_t, grad_t>();
  static constexpr bool kChunkResults = kWithNorm;  // one norm partial per chunk
  double scale;
  const float* amp_scale;  // GradScaler's scale on the device, or null
  double* partials;
  int64_t first_chunk;
  double* pieces;  // kPerTensor: each (tensor, chunk) piece's own partial (tensor_pieces.cuh)
  int64_t first_piece;
  math_t factor = math_t(0);  // scale (times the unscale factor), rounded once as on the CPU
  acc_t* acc = nullptr;
  const grad_t* grad = nullptr;
  ThreadNorm<kInfNorm> norm;
  ThreadNorm<kInfNorm> piece;

  __device__ __forceinline__ bool begin_block() {
    // Unscaled on the device (no host sync); the product is formed in double like the CPU's.
    factor = static_cast<math_t>(amp_scale != nullptr ? scale * static_cast<double>(amp_inverse_scale(*amp_scale))
                                                      : scale);
    return true;
  }

  template <typename Table>
  __device__ __forceinline__ void segment(const Table& table, int t, int64_t begin, int64_t n) {
    acc = static_cast<acc_t*>(table.ptrs[0][t]) + begin;
    grad = static_cast<const grad_t*>(table.ptrs[1][t]) + begin;
    sweep_segment<kWidth>(n, pack_alignment<kWidth>(acc, grad), *this);
    if constexpr (kPerTensor) {  // every thread of the block reaches this (segments are block-uniform)
      store_chunk_partial<kInfNorm>(piece.value, pieces, first_piece + t + chunk_of_segment(table, t, begin));
      piece.value = 0.0;
    }
  }

  template <int W>
  __device__ __forceinline__ void run(const int64_t (&elem)[kIlp<W>], const bool (&valid)[kIlp<W>]) {
    Pack<acc_t, W> a[kIlp<W>];
    Pack<grad_t, W> g[kIlp<W>];
#pragma unroll
    for (int k = 0; k < kIlp<W>; ++k) {
      if (valid[k]) {
        g[k] = load_pack<W>(grad + elem[k]);
        if constexpr (!kFirst) {
          a[k] = load_pack<W>(acc + elem[k]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp<W>; ++k) {
      if (valid[k]) {
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const math_t base = kFirst ? math_t(0) : static_cast<math_t>(a[k].val[j]);
          a[k].val[j] = static_cast<acc_t>(add_scaled(base, factor, static_cast<math_t>(g[k].val[j])));
        }
        if constexpr (kWithNorm) {
          add_values(norm, a[k].val);  // norm of what is stored
        }
        if constexpr (kPerTensor) {
          add_values(piece, a[k].val);
        }
        store_pack<W>(acc + elem[k], a[k]);
      }
    }
  }

  __device__ __forceinline__ void end_chunk(int64_t chunk) {
    if constexpr (kWithNorm) {
      store_chunk_partial<kInfNorm>(norm.value, partials, first_chunk + chunk);
      norm.value = 0.0;
    }
  }

  __device__ __forceinline__ void end_block() {}
};

template <typename acc_t, typename grad_t>
void accumulate_typed(at::TensorList accs, at::TensorList grads, double scale, bool first,
                      const std::optional<at::Tensor>& norm_state, bool inf_norm, const float* amp_scale,
                      const std::optional<at::Tensor>& tensor_norms, const at::Device& device, cudaStream_t stream) {
  GRADFUSE_BOOL_SWITCH(first, kFirst, [&] {
    GRADFUSE_BOOL_SWITCH(norm_state.has_value(), kWithNorm, [&] {
      GRADFUSE_BOOL_SWITCH(inf_norm, kInfNorm, [&] {
        GRADFUSE_BOOL_SWITCH(kWithNorm && tensor_norms.has_value(), kPerTensor, [&] {
          using Op = AccumulateOp<acc_t, grad_t, kFirst, kWithNorm, kWithNorm && kInfNorm, kWithNorm && kPerTensor>;
          const MultiTensorLaunch<2, Op> launch({accs, grads}, {true, false}, device.index());
          if (launch.total_chunks() == 0) {
            return;  // only empty tensors: nothing to add, a zero partial changes no state
          }
          at::Tensor partials;
          at::Tensor pieces;
          double* partials_ptr = nullptr;
          double* pieces_ptr = nullptr;
          if constexpr (kWithNorm) {
            partials = at::empty({launch.total_chunks()}, norm_state->options());
            partials_ptr = partials.mutable_data_ptr<double>();
          }
          if constexpr (kWithNorm && kPerTensor) {
            pieces = at::empty({launch.total_pieces()}, norm_state->options());
            pieces_ptr = pieces.mutable_data_ptr<double>();
          }
          launch.launch(stream, [&](int64_t first_chunk, int64_t first_piece) {
            return Op{scale, amp_scale, partials_ptr, first_chunk, pieces_ptr, first_piece};
          });
          if constexpr (kWithNorm) {
            merge_partials_into_state(partials, *norm_state, inf_norm, stream);
          }
          if constexpr (kWithNorm && kPerTensor) {
            merge_tensor_pieces(launch, pieces, *tensor_norms, inf_norm, stream);
          }
        });
      });
    });
  });
}

}  // namespace

void accumulate_(at::TensorList accs, at::TensorList grads, double scale, bool first,
                 const std::optional<at::Tensor>& norm_state, double norm_type,
                 const std::optional<at::Tensor>& amp_scale, const std::optional<at::Tensor>& tensor_norms) {

  if (accs.empty() && !norm_state.has_value()) {
    return;
  }
  const at::Device device = accs.empty() ? norm_state->device() : accs[0].device();
  check_cuda_device(kAccumulateOp, accs.empty() ? "norm_state" : "accs[0]", device);
  check_accumulate_inputs(accs, grads, norm_state, norm_type, amp_scale, device);
  check_tensor_norms(kAccumulateOp, tensor_norms, norm_state.has_value(), accs.size(), device);
  const float* amp_scale_ptr = amp_scale.has_value() ? amp_scale->const_data_ptr<float>() : nullptr;
  if (accs.empty()) {
    return;
  }
  const at::ScalarType acc_type = accs[0].scalar_type();
  const at::ScalarType grad_type = grads[0].scalar_type();
  const bool inf_norm = is_inf_norm(norm_type);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_type, "gradfuse_accumulate_cuda", [&] {
    if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
      if (acc_type == at::kFloat) {
        accumulate_typed<float, scalar_t>(accs, grads, scale, first, norm_state, inf_norm, amp_scale_ptr,
                                          tensor_norms, device, stream);
        return;
      }
    }
    accumulate_typed<scalar_t, scalar_t>(accs, grads, scale, first, norm_state, inf_norm, amp_scale_ptr,
                                         tensor_norms, device, stream);
  });
}

}  // namespace gradfuse::cuda
