// The complete input checks of each op, shared by the CPU and CUDA implementations: every op
// validates all of its inputs here before it touches any memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace gradfuse {

// The device an op call runs on: the first tensor's, or `fallback`'s when the lists are empty.
at::Device call_device(at::TensorList list, const at::Tensor& fallback);

// tensor_norms (per-tensor norm partials): float64, one per tensor, on device, only with a norm.
void check_tensor_norms(const char* op, const std::optional<at::Tensor>& tensor_norms, bool with_norm,
                        size_t num_tensors, const at::Device& device);

void check_accumulate_inputs(at::TensorList accs, at::TensorList grads, const std::optional<at::Tensor>& norm_state,
                             double norm_type, const std::optional<at::Tensor>& amp_scale, const at::Device& device);
void check_norm_inputs(const at::Tensor& norm_state, at::TensorList tensors, double norm_type,
                       const at::Device& device);
void check_finalize_inputs(const at::Tensor& norm_state, const at::Tensor& skipped_steps, double norm_type,
                           const at::Device& device);
void check_step_inputs(at::TensorList params, at::TensorList grads, at::TensorList buffers,
                       at::TensorList initialized, const at::Tensor& total_norm,
                       const std::optional<at::Tensor>& lr_tensor, double momentum, const at::Device& device);
void check_adamw_step_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                             const at::Tensor& total_norm, const std::optional<at::Tensor>& lr_tensor, double beta1,
                             double beta2, double eps, bool amsgrad, const at::Device& device);

}  // namespace gradfuse
