// clipped_adamw_step_ on CUDA: every block derives the clip factor and skip decision from the
// device-resident total norm (and lr tensor), each segment its tensor's bias corrections from
// the device-resident step count; a second launch then counts the step, so nothing syncs.
#include "../element_math.h"
#include "../op_checks.h"
#include "../ops.h"
#include "../static_switch.h"
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

constexpr const char* kAdamwStepOp = "gradfuse::clipped_adamw_step_";

// Host-side settings of one step; the norm-, lr- and step-dependent parts are resolved on the device.
struct AdamwSettings {
  const double* total_norm;
  DeviceLr lr;
  double signed_grad_scale;  // (maximize ? -1 : 1) * grad_scale, as the CPU forms it
  double max_norm;
  double weight_decay;
  double beta1;
  double beta2;
  double eps;
  bool skip_nonfinite;
  bool double_steps;  // state_steps are float64 (else float32)
};

// A tensor's step count after this update: the stored count + 1, added in the count's dtype
// (the CPU does the same, and the increment launch stores exactly this value).
__device__ __forceinline__ double incremented_step(const void* step, bool double_steps) {
  return double_steps ? *static_cast<const double*>(step) + 1.0
                      : static_cast<double>(*static_cast<const float*>(step) + 1.0f);
}

// Lists: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, 4 state_steps (read only: counted by
// IncrementStepsOp afterwards), and with amsgrad 5 max_exp_avg_sqs.
template <typename param_t, typename grad_t, bool kAmsgrad>
struct AdamwOp {
  using math_t = at::opmath_type<param_t>;
  static constexpr int kDepth = kAmsgrad ? 6 : 5;
  static constexpr int kWidth = pack_width<param_t, grad_t>();
  static constexpr bool kChunkResults = false;
  AdamwSettings settings;
  AdamScalars<math_t> s{};
  double lr = 0.0;
  double scalars_step = -1.0;  // the step count s's bias corrections were formed for
  param_t* param = nullptr;
  const grad_t* grad = nullptr;
  param_t* exp_avg = nullptr;
  param_t* exp_avg_sq = nullptr;
  param_t* max_exp_avg_sq = nullptr;

  __device__ __forceinline__ bool begin_block() {
    const double norm = *settings.total_norm;
    if (skip_update(norm, settings.skip_nonfinite)) {
      return false;  // a skipped step touches nothing
    }
    lr = settings.lr.read();
    s.grad_mult = static_cast<math_t>(settings.signed_grad_scale * clip_coefficient(norm, settings.max_norm));
    s.decay = static_cast<math_t>(1.0 - lr * settings.weight_decay);
    s.lerp_weight = static_cast<math_t>(1.0 - settings.beta1);
    s.beta2 = static_cast<math_t>(settings.beta2);
    s.beta2_complement = static_cast<math_t>(1.0 - settings.beta2);
    s.eps = static_cast<math_t>(settings.eps);
    return true;
  }

  template <typename Table>
  __device__ __forceinline__ void segment(const Table& table, int t, int64_t begin, int64_t n) {
    param = static_cast<param_t*>(table.ptrs[0][t]) + begin;
    grad = static_cast<const grad_t*>(table.ptrs[1][t]) + begin;
    exp_avg = static_cast<param_t*>(table.ptrs[2][t]) + begin;
    exp_avg_sq = static_cast<param_t*>(table.ptrs[3][t]) + begin;
    if constexpr (kAmsgrad) {
      max_exp_avg_sq = static_cast<param_t*>(table.ptrs[5][t]) + begin;
    }
    const double step = incremented_step(table.ptrs[4][t], settings.double_steps);
    if (step != scalars_step) {  // a block's tensors usually share one count: the pow calls run once
      adamw_tensor_scalars(s, lr, settings.beta1, settings.beta2, step);
      scalars_step = step;
    }
    if constexpr (kAmsgrad) {
      sweep_segment<kWidth>(n, pack_alignment<kWidth>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq), *this);
    } else {
      sweep_segment<kWidth>(n, pack_alignment<kWidth>(param, grad, exp_avg, exp_avg_sq), *this);
    }
  }

  template <int W>
  __device__ __forceinline__ void run(const int64_t (&elem)[kIlp<W>], const bool (&valid)[kIlp<W>]) {
    Pack<param_t, W> p[kIlp<W>];
    Pack<grad_t, W> g[kIlp<W>];
    Pack<param_t, W> m[kIlp<W>];
    Pack<param_t, W> v[kIlp<W>];
    Pack<param_t, W> v_max[kIlp<W>];
#pragma unroll
    for (int k = 0; k < kIlp<W>; ++k) {
      if (valid[k]) {
        p[k] = load_pack<W>(param + elem[k]);
        g[k] = load_pack<W>(grad + elem[k]);
        m[k] = load_pack<W>(exp_avg + elem[k]);
        v[k] = load_pack<W>(exp_avg_sq + elem[k]);
        if constexpr (kAmsgrad) {
          v_max[k] = load_pack<W>(max_exp_avg_sq + elem[k]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp<W>; ++k) {
      if (valid[k]) {
#pragma unroll
        for (int j = 0; j < W; ++j) {
          math_t pv = static_cast<math_t>(p[k].val[j]);
          math_t mv = static_cast<math_t>(m[k].val[j]);
          math_t vv = static_cast<math_t>(v[k].val[j]);
          math_t v_max_v = kAmsgrad ? static_cast<math_t>(v_max[k].val[j]) : math_t(0);
          adamw_update<kAmsgrad>(pv, mv, vv, v_max_v, static_cast<math_t>(g[k].val[j]), s);
          p[k].val[j] = static_cast<param_t>(pv);
          m[k].val[j] = static_cast<param_t>(mv);
          v[k].val[j] = static_cast<param_t>(vv);
          if constexpr (kAmsgrad) {
            v_max[k].val[j] = static_cast<param_t>(v_max_v);
          }
        }
        store_pack<W>(param + elem[k], p[k]);
        store_pack<W>(exp_avg + elem[k], m[k]);
        store_pack<W>(exp_avg_sq + elem[k], v[k]);
        if constexpr (kAmsgrad) {
          store_pack<W>(max_exp_avg_sq + elem[k], v_max[k]);
        }
      }
    }
  }

  __device__ __forceinline__ void end_block() {}
};

// Counts the step of every tensor after a non-skipped update: a separate launch, since the
// update's blocks read the old counts while it runs (a tensor spans several blocks).
struct IncrementStepsOp {
  static constexpr bool kChunkResults = false;
  const double* total_norm;
  bool skip_nonfinite;
  bool double_steps;

  __device__ __forceinline__ bool begin_block() { return !skip_update(*total_norm, skip_nonfinite); }

  template <typename Table>
  __device__ __forceinline__ void segment(const Table& table, int t, int64_t begin, int64_t n) {
    if (threadIdx.x == 0 && begin == 0) {  // a 1-element tensor is one segment of one block
      void* step = table.ptrs[0][t];
      const double next = incremented_step(step, double_steps);
      if (double_steps) {
        *static_cast<double*>(step) = next;
      } else {
        *static_cast<float*>(step) = static_cast<float>(next);  // exact: a float32 sum
      }
    }
  }

  __device__ __forceinline__ void end_block() {}
};

template <typename param_t, typename grad_t, bool kAmsgrad>
void adamw_step_typed(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                      const AdamwSettings& settings, int device, cudaStream_t stream) {
  using Op = AdamwOp<param_t, grad_t, kAmsgrad>;
  const auto make_op = [&](int64_t) { return Op{settings}; };
  if constexpr (kAmsgrad) {
    const MultiTensorLaunch<6, Op> launch({params, grads, exp_avgs, exp_avg_sqs, state_steps, max_exp_avg_sqs},
                                          {true, false, true, true, false, true}, device);
    launch.launch(stream, make_op);
  } else {
    const MultiTensorLaunch<5, Op> launch({params, grads, exp_avgs, exp_avg_sqs, state_steps},
                                          {true, false, true, true, false}, device);
    launch.launch(stream, make_op);
  }
}

}  // namespace

void clipped_adamw_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         const at::Tensor& total_norm, const std::optional<at::Tensor>& lr_tensor, double lr,
                         double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                         double grad_scale, double max_norm, bool skip_nonfinite) {
  const at::Device device = params.empty() ? total_norm.device() : params[0].device();
  check_cuda_device(kAdamwStepOp, params.empty() ? "total_norm" : "params[0]", device);
  check_adamw_step_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, total_norm, lr_tensor,
                          beta1, beta2, eps, amsgrad, device);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  at::Tensor lr_holder;
  const bool double_steps = state_steps[0].scalar_type() == at::kDouble;
  const AdamwSettings settings{total_norm.const_data_ptr<double>(),
                               resolve_lr(lr_tensor, lr, lr_holder),
                               (maximize ? -1.0 : 1.0) * grad_scale,
                               max_norm,
                               weight_decay,
                               beta1,
                               beta2,
                               eps,
                               skip_nonfinite,
                               double_steps};
  const at::ScalarType grad_type = grads[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "gradfuse_adamw_cuda", [&] {
    GRADFUSE_BOOL_SWITCH(amsgrad, kAmsgrad, [&] {
      if constexpr (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>) {
        if (grad_type == at::kFloat) {
          adamw_step_typed<scalar_t, float, kAmsgrad>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                                      state_steps, settings, device.index(), stream);
          return;
        }
      }
      adamw_step_typed<scalar_t, scalar_t, kAmsgrad>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                                     state_steps, settings, device.index(), stream);
    });
  });
  // After the update, which reads the old counts.
  const MultiTensorLaunch<1, IncrementStepsOp> count({state_steps}, {true}, device.index());
  count.launch(stream, [&](int64_t) { return IncrementStepsOp{settings.total_norm, skip_nonfinite, double_steps}; });
}

}  // namespace gradfuse::cuda
