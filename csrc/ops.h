// Signatures of the gradfuse ops, implemented once per backend (cpu/, cuda/).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace gradfuse {

// Layout of the per-device norm accumulator: [running value, non-finite flag], float64.
constexpr int64_t kNormStateSize = 2;

namespace cpu {
void accumulate_(at::TensorList accs, at::TensorList grads, double scale, bool first,
                 const std::optional<at::Tensor>& norm_state, double norm_type,
                 const std::optional<at::Tensor>& amp_scale, const std::optional<at::Tensor>& tensor_norms);
void accumulate_norm_(const at::Tensor& norm_state, at::TensorList tensors, double norm_type,
                      const std::optional<at::Tensor>& tensor_norms);
at::Tensor finalize_norm_(const at::Tensor& norm_state, const at::Tensor& skipped_steps,
                          double norm_type, double scale, bool count_nonfinite);
void clipped_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                       at::TensorList momentum_initialized, const at::Tensor& total_norm,
                       const std::optional<at::Tensor>& lr_tensor, double lr, double weight_decay,
                       double momentum, double dampening, bool nesterov, bool maximize,
                       double grad_scale, double max_norm, bool skip_nonfinite);
void clipped_adamw_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         const at::Tensor& total_norm, const std::optional<at::Tensor>& lr_tensor, double lr,
                         double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                         double grad_scale, double max_norm, bool skip_nonfinite);
}  // namespace cpu

#ifdef GRADFUSE_WITH_CUDA
namespace cuda {
void accumulate_(at::TensorList accs, at::TensorList grads, double scale, bool first,
                 const std::optional<at::Tensor>& norm_state, double norm_type,
                 const std::optional<at::Tensor>& amp_scale, const std::optional<at::Tensor>& tensor_norms);
void accumulate_norm_(const at::Tensor& norm_state, at::TensorList tensors, double norm_type,
                      const std::optional<at::Tensor>& tensor_norms);
at::Tensor finalize_norm_(const at::Tensor& norm_state, const at::Tensor& skipped_steps,
                          double norm_type, double scale, bool count_nonfinite);
void clipped_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                       at::TensorList momentum_initialized, const at::Tensor& total_norm,
                       const std::optional<at::Tensor>& lr_tensor, double lr, double weight_decay,
                       double momentum, double dampening, bool nesterov, bool maximize,
                       double grad_scale, double max_norm, bool skip_nonfinite);
void clipped_adamw_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         const at::Tensor& total_norm, const std::optional<at::Tensor>& lr_tensor, double lr,
                         double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                         double grad_scale, double max_norm, bool skip_nonfinite);
}  // namespace cuda
#endif

}  // namespace gradfuse
