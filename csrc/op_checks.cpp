#include "op_checks.h"

#include "tensor_checks.h"

#include <c10/util/Exception.h>

namespace gradfuse {
namespace {

constexpr const char* kAccumulateOp = "gradfuse::accumulate_";
constexpr const char* kNormOp = "gradfuse::accumulate_norm_";
constexpr const char* kFinalizeOp = "gradfuse::finalize_norm_";
constexpr const char* kStepOp = "gradfuse::clipped_sgd_step_";
constexpr const char* kAdamwStepOp = "gradfuse::clipped_adamw_step_";

// The one dtype pairing the kernels support: equal dtypes, or float32 `wide` for a half `narrow`.
bool same_or_float32_over_half(at::ScalarType wide, at::ScalarType narrow) {
  return wide == narrow || (wide == at::kFloat && at::isReducedFloatingType(narrow));
}

// The update ops' total_norm (0-dim float64) and optional lr tensor (one real float element).
void check_norm_and_lr(const char* op, const at::Tensor& total_norm, const std::optional<at::Tensor>& lr_tensor,
                       const at::Device& device) {
  check_scalar_tensor(op, "total_norm", total_norm, device);
  check_dtype(op, "total_norm", 0, total_norm, at::kDouble);
  if (lr_tensor.has_value()) {
    check_scalar_tensor(op, "lr_tensor", *lr_tensor, device);
    TORCH_CHECK_TYPE(lr_tensor->is_floating_point(), op, ": lr_tensor must be a real floating-point tensor, got ",
                     lr_tensor->scalar_type());
  }
}

// Gradients in the parameters' dtype, or float32 (an accumulator) for float16/bfloat16 parameters.
void check_grad_pairing(const char* op, at::TensorList params, at::TensorList grads) {
  if (params.empty()) {
    return;
  }
  const at::ScalarType p = params[0].scalar_type();
  const at::ScalarType g = grads[0].scalar_type();
  TORCH_CHECK_TYPE(same_or_float32_over_half(g, p), op, ": gradients of dtype ", g,
                   " cannot update parameters of dtype ", p,
                   "; use the parameter dtype, or float32 for float16/bfloat16 parameters");
}

// An optimizer state tensor of parameter `param`: its dtype, device, shape and memory layout.
void check_moment(const char* op, const char* name, int64_t index, const at::Tensor& t, const at::Tensor& param) {
  check_dense_float(op, name, index, t);
  check_dtype(op, name, index, t, param.scalar_type());
  check_same_layout(op, name, index, t, "params", param);
}

}  // namespace

at::Device call_device(at::TensorList list, const at::Tensor& fallback) {
  return list.empty() ? fallback.device() : list[0].device();
}

void check_tensor_norms(const char* op, const std::optional<at::Tensor>& tensor_norms, bool with_norm,
                        size_t num_tensors, const at::Device& device) {
  if (!tensor_norms.has_value()) {
    return;
  }
  const at::Tensor& t = *tensor_norms;
  TORCH_CHECK_VALUE(with_norm, op, ": tensor_norms needs norm_state (per-tensor norms come from the norm pass)");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kDouble && t.dim() == 1 && t.is_contiguous() &&
                        t.numel() == static_cast<int64_t>(num_tensors),
                    op, ": tensor_norms must be a contiguous float64 vector of ", num_tensors, " entries");
  TORCH_CHECK_VALUE(t.device() == device, op, ": tensor_norms is on ", t.device(), " but the tensors are on ",
                    device);
}

void check_accumulate_inputs(at::TensorList accs, at::TensorList grads, const std::optional<at::Tensor>& norm_state,
                             double norm_type, const std::optional<at::Tensor>& amp_scale, const at::Device& device) {
  check_norm_type(kAccumulateOp, norm_type);
  check_same_length(kAccumulateOp, "grads", grads, "accs", accs);
  check_all_same_dtype(kAccumulateOp, "accs", accs);
  check_all_same_dtype(kAccumulateOp, "grads", grads);
  for (size_t i = 0; i < accs.size(); ++i) {
    check_dense_float(kAccumulateOp, "accs", i, accs[i]);
    check_dense_float(kAccumulateOp, "grads", i, grads[i]);
    check_on_device(kAccumulateOp, "accs", i, accs[i], device);
    check_same_layout(kAccumulateOp, "grads", i, grads[i], "accs", accs[i]);
  }
  if (norm_state.has_value()) {
    check_norm_state(kAccumulateOp, *norm_state, device);
  }
  if (amp_scale.has_value()) {
    check_amp_scale(kAccumulateOp, *amp_scale, device);
  }
  if (!accs.empty()) {
    const at::ScalarType a = accs[0].scalar_type();
    const at::ScalarType g = grads[0].scalar_type();
    TORCH_CHECK_TYPE(same_or_float32_over_half(a, g), kAccumulateOp,
                     ": accumulators of dtype ", a, " cannot take gradients of dtype ", g,
                     "; use the gradient dtype, or float32 for float16/bfloat16 gradients");
  }
}

void check_norm_inputs(const at::Tensor& norm_state, at::TensorList tensors, double norm_type,
                       const at::Device& device) {
  check_norm_type(kNormOp, norm_type);
  check_norm_state(kNormOp, norm_state, device);
  check_all_same_dtype(kNormOp, "tensors", tensors);
  for (size_t i = 0; i < tensors.size(); ++i) {
    check_dense_float(kNormOp, "tensors", i, tensors[i]);
    check_on_device(kNormOp, "tensors", i, tensors[i], device);
  }
}

void check_finalize_inputs(const at::Tensor& norm_state, const at::Tensor& skipped_steps, double norm_type,
                           const at::Device& device) {
  check_norm_type(kFinalizeOp, norm_type);
  check_norm_state(kFinalizeOp, norm_state, device);
  check_scalar_tensor(kFinalizeOp, "skipped_steps", skipped_steps, device);
  check_dtype(kFinalizeOp, "skipped_steps", 0, skipped_steps, at::kLong);
}

void check_step_inputs(at::TensorList params, at::TensorList grads, at::TensorList buffers,
                       at::TensorList initialized, const at::Tensor& total_norm,
                       const std::optional<at::Tensor>& lr_tensor, double momentum, const at::Device& device) {
  check_same_length(kStepOp, "grads", grads, "params", params);
  check_all_same_dtype(kStepOp, "params", params);
  check_all_same_dtype(kStepOp, "grads", grads);
  const bool use_momentum = momentum != 0.0;
  if (use_momentum) {
    check_same_length(kStepOp, "momentum_buffers", buffers, "params", params);
    check_same_length(kStepOp, "momentum_initialized", initialized, "params", params);
  }
  for (size_t i = 0; i < params.size(); ++i) {
    check_dense_float(kStepOp, "params", i, params[i]);
    check_on_device(kStepOp, "params", i, params[i], device);
    check_dense_float(kStepOp, "grads", i, grads[i]);
    check_same_layout(kStepOp, "grads", i, grads[i], "params", params[i]);
    if (use_momentum) {
      check_moment(kStepOp, "momentum_buffers", i, buffers[i], params[i]);
      check_dtype(kStepOp, "momentum_initialized", i, initialized[i], at::kBool);
      check_scalar_tensor(kStepOp, "momentum_initialized", initialized[i], device);
    }
  }
  check_norm_and_lr(kStepOp, total_norm, lr_tensor, device);
  check_grad_pairing(kStepOp, params, grads);
}

void check_adamw_step_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                             const at::Tensor& total_norm, const std::optional<at::Tensor>& lr_tensor, double beta1,
                             double beta2, double eps, bool amsgrad, const at::Device& device) {
  // Negated comparisons so that NaN fails them too.
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, kAdamwStepOp, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, kAdamwStepOp, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, kAdamwStepOp, ": eps must be >= 0, got ", eps);
  check_same_length(kAdamwStepOp, "grads", grads, "params", params);
  check_same_length(kAdamwStepOp, "exp_avgs", exp_avgs, "params", params);
  check_same_length(kAdamwStepOp, "exp_avg_sqs", exp_avg_sqs, "params", params);
  if (amsgrad) {
    check_same_length(kAdamwStepOp, "max_exp_avg_sqs", max_exp_avg_sqs, "params", params);
  }
  check_same_length(kAdamwStepOp, "state_steps", state_steps, "params", params);
  check_all_same_dtype(kAdamwStepOp, "params", params);
  check_all_same_dtype(kAdamwStepOp, "grads", grads);
  check_all_same_dtype(kAdamwStepOp, "state_steps", state_steps);
  for (size_t i = 0; i < params.size(); ++i) {
    check_dense_float(kAdamwStepOp, "params", i, params[i]);
    check_on_device(kAdamwStepOp, "params", i, params[i], device);
    check_dense_float(kAdamwStepOp, "grads", i, grads[i]);
    check_same_layout(kAdamwStepOp, "grads", i, grads[i], "params", params[i]);
    check_moment(kAdamwStepOp, "exp_avgs", i, exp_avgs[i], params[i]);
    check_moment(kAdamwStepOp, "exp_avg_sqs", i, exp_avg_sqs[i], params[i]);
    if (amsgrad) {
      check_moment(kAdamwStepOp, "max_exp_avg_sqs", i, max_exp_avg_sqs[i], params[i]);
    }
    check_dense_float(kAdamwStepOp, "state_steps", i, state_steps[i]);
    check_scalar_tensor(kAdamwStepOp, "state_steps", state_steps[i], device);
  }
  if (!state_steps.empty()) {
    const at::ScalarType s = state_steps[0].scalar_type();
    TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble, kAdamwStepOp, ": state_steps have dtype ", s,
                     "; torch.optim.AdamW's step is a float32 (or float64) tensor");
  }
  check_norm_and_lr(kAdamwStepOp, total_norm, lr_tensor, device);
  check_grad_pairing(kAdamwStepOp, params, grads);
}

}  // namespace gradfuse
