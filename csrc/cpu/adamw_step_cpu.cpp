// clipped_adamw_step_ on the CPU: the clip factor and skip decision come from the norm tensor
// (the rules SGD uses), bias corrections from each tensor's own step count, and the update is
// one sweep over params and moments (kernels/adamw_kernel.cpp, per CPU capability, holds the hot loop).
#include "../element_math.h"
#include "../op_checks.h"
#include "../ops.h"
#include "cpu_capability.h"
#include "flat_chunks.h"

#include <vector>

namespace gradfuse::cpu {
namespace {

// Each tensor's step count after this update: the stored count + 1, added in the count's dtype.
std::vector<double> incremented_steps(at::TensorList state_steps) {
  std::vector<double> steps(state_steps.size());
  const bool is_double = !state_steps.empty() && state_steps[0].scalar_type() == at::kDouble;
  for (size_t t = 0; t < state_steps.size(); ++t) {
    steps[t] = is_double ? *state_steps[t].const_data_ptr<double>() + 1.0
                         : static_cast<double>(*state_steps[t].const_data_ptr<float>() + 1.0f);
  }
  return steps;
}

void store_steps(at::TensorList state_steps, const std::vector<double>& steps) {
  for (size_t t = 0; t < state_steps.size(); ++t) {
    if (state_steps[t].scalar_type() == at::kDouble) {
      *state_steps[t].mutable_data_ptr<double>() = steps[t];
    } else {
      *state_steps[t].mutable_data_ptr<float>() = static_cast<float>(steps[t]);  // exact: a float32 sum
    }
  }
}

// The scalars every tensor of the call shares, in the math type.
template <typename math_t>
AdamScalars<math_t> common_scalars(double grad_mult, double lr, double weight_decay, double beta1, double beta2,
                                   double eps) {
  AdamScalars<math_t> common{};
  common.grad_mult = static_cast<math_t>(grad_mult);
  common.decay = static_cast<math_t>(1.0 - lr * weight_decay);
  common.lerp_weight = static_cast<math_t>(1.0 - beta1);
  common.beta2 = static_cast<math_t>(beta2);
  common.beta2_complement = static_cast<math_t>(1.0 - beta2);
  common.eps = static_cast<math_t>(eps);
  return common;
}

// The call's scalars completed per tensor with the bias corrections of its step.
template <typename math_t>
std::vector<AdamScalars<math_t>> per_tensor_scalars(const AdamScalars<math_t>& common, const std::vector<double>& steps,
                                                    double lr, double beta1, double beta2) {
  std::vector<AdamScalars<math_t>> scalars(steps.size(), common);
  for (size_t t = 0; t < steps.size(); ++t) {
    if (t > 0 && steps[t] == steps[t - 1]) {
      scalars[t] = scalars[t - 1];  // tensors of one group share their count: two pow calls saved
    } else {
      adamw_tensor_scalars(scalars[t], lr, beta1, beta2, steps[t]);
    }
  }
  return scalars;
}

}  // namespace

void clipped_adamw_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         const at::Tensor& total_norm, const std::optional<at::Tensor>& lr_tensor, double lr,
                         double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                         double grad_scale, double max_norm, bool skip_nonfinite) {
  check_adamw_step_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, total_norm, lr_tensor,
                          beta1, beta2, eps, amsgrad, at::Device(at::kCPU));
  const double norm = total_norm.item<double>();  // CPU memory: no device synchronisation involved
  if (params.empty() || skip_update(norm, skip_nonfinite)) {
    return;  // a skipped step changes nothing, not even the step counts
  }
  const double effective_lr = lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
  const double grad_mult = (maximize ? -1.0 : 1.0) * grad_scale * clip_coefficient(norm, max_norm);
  const std::vector<double> steps = incremented_steps(state_steps);
  const FlatChunks chunks(params);
  const auto param_ptrs = data_pointers<void>(params);
  const auto grad_ptrs = data_pointers<const void>(grads);
  const auto exp_avg_ptrs = data_pointers<void>(exp_avgs);
  const auto exp_avg_sq_ptrs = data_pointers<void>(exp_avg_sqs);
  const auto max_ptrs = data_pointers<void>(amsgrad ? max_exp_avg_sqs : at::TensorList());
  const auto float_scalars = per_tensor_scalars(
      common_scalars<float>(grad_mult, effective_lr, weight_decay, beta1, beta2, eps), steps, effective_lr, beta1, beta2);
  const auto double_scalars = params[0].scalar_type() == at::kDouble
      ? per_tensor_scalars(common_scalars<double>(grad_mult, effective_lr, weight_decay, beta1, beta2, eps), steps,
                           effective_lr, beta1, beta2)
      : std::vector<AdamScalars<double>>();
  const AdamwArgs args{chunks.layout(),          param_ptrs.data(),     grad_ptrs.data(),
                       exp_avg_ptrs.data(),      exp_avg_sq_ptrs.data(), max_ptrs.data(),
                       params[0].scalar_type(),  grads[0].scalar_type(), amsgrad,
                       float_scalars.data(),     double_scalars.data()};
  const CpuKernels& kernels = cpu_kernels();
  chunks.parallel_for_chunks([&](int64_t c) { kernels.adamw_chunk(args, c); });
  store_steps(state_steps, steps);
}

}  // namespace gradfuse::cpu
