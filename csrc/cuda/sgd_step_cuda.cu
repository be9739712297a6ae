// clipped_sgd_step_ on CUDA: every block derives the clip factor and skip decision from the
// device-resident total norm (and lr tensor), then one pass updates params and momentum.
#include "../element_math.h"
#include "../op_checks.h"
#include "../ops.h"
#include "../static_switch.h"
#include "../tensor_checks.h"
#include "cuda_device.h"
#include "device_lr.cuh"
#include "multi_tensor_apply.cuh"
#include "vector_io.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace gradfuse::cuda {
namespace {

constexpr const char* kStepOp = "gradfuse::clipped_sgd_step_";

// Host-side settings of one step; the norm-dependent parts are resolved per block on the device.
struct StepSettings {
  const double* total_norm;
  DeviceLr lr;
  double signed_grad_scale;  // (maximize ? -1 : 1) * grad_scale, as the CPU forms it
  double max_norm;
  double weight_decay;
  double momentum;
  double dampening;
  bool nesterov;
  bool skip_nonfinite;
};

// List 0 params, 1 grads, and with momentum 2 buffers, 3 initialized flags.
template <typename param_t, typename grad_t, bool kMomentum>
struct SgdOp {
  using math_t = at::opmath_type<param_t>;
  static constexpr int kDepth = kMomentum ? 4 : 2;
  static constexpr int kWidth = pack_width<param_t, grad_t>();
  static constexpr bool kChunkResults = false;
  StepSettings settings;
  SgdScalars<math_t> s{};
  param_t* param = nullptr;
  const grad_t* grad = nullptr;
  param_t* buffer = nullptr;
  bool buffer_initialized = false;

  __device__ __forceinline__ bool begin_block() {
    const double norm = *settings.total_norm;
    if (skip_update(norm, settings.skip_nonfinite)) {
      return false;  // a skipped step touches nothing
    }
    s.grad_mult = static_cast<math_t>(settings.signed_grad_scale * clip_coefficient(norm, settings.max_norm));
    s.lr = static_cast<math_t>(settings.lr.read());
    s.weight_decay = static_cast<math_t>(settings.weight_decay);
    s.momentum = static_cast<math_t>(settings.momentum);
    s.dampening_complement = static_cast<math_t>(1.0 - settings.dampening);
    s.use_momentum = kMomentum;
    s.nesterov = settings.nesterov;
    return true;
  }

  template <typename Table>
  __device__ __forceinline__ void segment(const Table& table, int t, int64_t begin, int64_t n) {
    param = static_cast<param_t*>(table.ptrs[0][t]) + begin;
    grad = static_cast<const grad_t*>(table.ptrs[1][t]) + begin;
    if constexpr (kMomentum) {
      buffer = static_cast<param_t*>(table.ptrs[2][t]) + begin;
      buffer_initialized = *static_cast<const bool*>(table.ptrs[3][t]);  // flags change only after this pass
    }
    if constexpr (kMomentum) {
      sweep_segment<kWidth>(n, pack_alignment<kWidth>(param, grad, buffer), *this);
    } else {
      sweep_segment<kWidth>(n, pack_alignment<kWidth>(param, grad), *this);
    }
  }

  template <int W>
  __device__ __forceinline__ void run(const int64_t (&elem)[kIlp<W>], const bool (&valid)[kIlp<W>]) {
    Pack<param_t, W> p[kIlp<W>];
    Pack<grad_t, W> g[kIlp<W>];
    Pack<param_t, W> b[kIlp<W>];
#pragma unroll
    for (int k = 0; k < kIlp<W>; ++k) {
      if (valid[k]) {
        p[k] = load_pack<W>(param + elem[k]);
        g[k] = load_pack<W>(grad + elem[k]);
        if (kMomentum && buffer_initialized) {  // a fresh buffer is overwritten unread
          b[k] = load_pack<W>(buffer + elem[k]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp<W>; ++k) {
      if (valid[k]) {
#pragma unroll
        for (int j = 0; j < W; ++j) {
          math_t pv = static_cast<math_t>(p[k].val[j]);
          math_t bv = kMomentum && buffer_initialized ? static_cast<math_t>(b[k].val[j]) : math_t(0);
          sgd_update(pv, bv, static_cast<math_t>(g[k].val[j]), s, buffer_initialized);
          p[k].val[j] = static_cast<param_t>(pv);
          if constexpr (kMomentum) {
            b[k].val[j] = static_cast<param_t>(bv);
          }
        }
        store_pack<W>(param + elem[k], p[k]);
        if constexpr (kMomentum) {
          store_pack<W>(buffer + elem[k], b[k]);
        }
      }
    }
  }

  __device__ __forceinline__ void end_block() {}
};

// Marks momentum buffers initialized after a non-skipped step: a separate launch, since the
// update's blocks read these flags while it runs.
struct MarkInitializedOp {
  static constexpr bool kChunkResults = false;
  const double* total_norm;
  bool skip_nonfinite;

  __device__ __forceinline__ bool begin_block() { return !skip_update(*total_norm, skip_nonfinite); }

  template <typename Table>
  __device__ __forceinline__ void segment(const Table& table, int t, int64_t begin, int64_t n) {
    if (threadIdx.x == 0) {
      *static_cast<bool*>(table.ptrs[0][t]) = true;
    }
  }

  __device__ __forceinline__ void end_block() {}
};

template <typename param_t, typename grad_t, bool kMomentum>
void sgd_step_typed(at::TensorList params, at::TensorList grads, at::TensorList buffers,
                    at::TensorList initialized, const StepSettings& settings, int device, cudaStream_t stream) {
  using Op = SgdOp<param_t, grad_t, kMomentum>;
  const auto make_op = [&](int64_t) { return Op{settings}; };
  if constexpr (kMomentum) {
    const MultiTensorLaunch<Op::kDepth, Op> launch({params, grads, buffers, initialized},
                                                   {true, false, true, false}, device);
    launch.launch(stream, make_op);
  } else {
    const MultiTensorLaunch<Op::kDepth, Op> launch({params, grads}, {true, false}, device);
    launch.launch(stream, make_op);
  }
}

}  // namespace

void clipped_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                       at::TensorList momentum_initialized, const at::Tensor& total_norm,
                       const std::optional<at::Tensor>& lr_tensor, double lr, double weight_decay,
                       double momentum, double dampening, bool nesterov, bool maximize, double grad_scale,
                       double max_norm, bool skip_nonfinite) {
  const at::Device device = params.empty() ? total_norm.device() : params[0].device();
  check_cuda_device(kStepOp, params.empty() ? "total_norm" : "params[0]", device);
  check_step_inputs(params, grads, momentum_buffers, momentum_initialized, total_norm, lr_tensor, momentum,
                    device);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  at::Tensor lr_holder;
  const StepSettings settings{total_norm.const_data_ptr<double>(),
                              resolve_lr(lr_tensor, lr, lr_holder),
                              (maximize ? -1.0 : 1.0) * grad_scale,
                              max_norm,
                              weight_decay,
                              momentum,
                              dampening,
                              nesterov,
                              skip_nonfinite};
  const bool use_momentum = momentum != 0.0;
  const at::ScalarType grad_type = grads[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "gradfuse_sgd_cuda", [&] {
    GRADFUSE_BOOL_SWITCH(use_momentum, kMomentum, [&] {
      if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
        if (grad_type == at::kFloat) {
          sgd_step_typed<scalar_t, float, kMomentum>(params, grads, momentum_buffers, momentum_initialized,
                                                     settings, device.index(), stream);
          return;
        }
      }
      sgd_step_typed<scalar_t, scalar_t, kMomentum>(params, grads, momentum_buffers, momentum_initialized,
                                                    settings, device.index(), stream);
    });
  });
  if (use_momentum) {  // after the update, which reads the old flags
    const MultiTensorLaunch<1, MarkInitializedOp> mark({momentum_initialized}, {true}, device.index());
    mark.launch(stream, [&](int64_t) { return MarkInitializedOp{settings.total_norm, skip_nonfinite}; });
  }
}

}  // namespace gradfuse::cuda
