// finalize_norm_ and clipped_sgd_step_ on the CPU: the clip factor and skip decision are
// derived from the norm tensor inside the op, and the update is one sweep over the data.
#include "../element_math.h"
#include "../op_checks.h"
#include "../ops.h"
#include "../tensor_checks.h"
#include "cpu_capability.h"
#include "flat_chunks.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

namespace gradfuse::cpu {
namespace {

// The pass's scalars in the math type of the parameters (float for fp32/fp16/bf16, double for fp64).
template <typename math_t>
SgdScalars<math_t> sgd_scalars(double grad_mult, double lr, double weight_decay, double momentum,
                               double dampening, bool nesterov) {
  return SgdScalars<math_t>{static_cast<math_t>(grad_mult), static_cast<math_t>(lr),
                            static_cast<math_t>(weight_decay), static_cast<math_t>(momentum),
                            static_cast<math_t>(1.0 - dampening), momentum != 0.0, nesterov};
}

}  // namespace

at::Tensor finalize_norm_(const at::Tensor& norm_state, const at::Tensor& skipped_steps, double norm_type,
                          double scale, bool count_nonfinite) {
  check_finalize_inputs(norm_state, skipped_steps, norm_type, at::Device(at::kCPU));
  double* state = norm_state.data_ptr<double>();
  const double norm = norm_finalize(state[0], state[1] != 0.0, is_inf_norm(norm_type), scale);
  state[0] = 0.0;  // ready for the next cycle without a separate zeroing pass
  state[1] = 0.0;
  if (count_nonfinite && !std::isfinite(norm)) {
    skipped_steps.data_ptr<int64_t>()[0] += 1;
  }
  at::Tensor result = at::empty({}, norm_state.options());
  result.data_ptr<double>()[0] = norm;
  return result;
}

void clipped_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                       at::TensorList momentum_initialized, const at::Tensor& total_norm,
                       const std::optional<at::Tensor>& lr_tensor, double lr, double weight_decay,
                       double momentum, double dampening, bool nesterov, bool maximize, double grad_scale,
                       double max_norm, bool skip_nonfinite) {
  check_step_inputs(params, grads, momentum_buffers, momentum_initialized, total_norm, lr_tensor, momentum,
                    at::Device(at::kCPU));
  const double norm = total_norm.item<double>();  // CPU memory: no device synchronisation involved
  if (params.empty() || skip_update(norm, skip_nonfinite)) {
    return;
  }
  const double effective_lr = lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
  const double grad_mult = (maximize ? -1.0 : 1.0) * grad_scale * clip_coefficient(norm, max_norm);
  const FlatChunks chunks(params);
  const auto param_ptrs = data_pointers<void>(params);
  const auto grad_ptrs = data_pointers<const void>(grads);
  const auto buffer_ptrs = data_pointers<void>(momentum_buffers);
  std::vector<char> buffer_initialized(params.size(), 0);
  for (size_t t = 0; t < momentum_initialized.size(); ++t) {
    buffer_initialized[t] = *momentum_initialized[t].const_data_ptr<bool>();
  }
  const SgdArgs args{chunks.layout(),
                     param_ptrs.data(),
                     grad_ptrs.data(),
                     buffer_ptrs.data(),
                     buffer_initialized.data(),
                     params[0].scalar_type(),
                     grads[0].scalar_type(),
                     sgd_scalars<float>(grad_mult, effective_lr, weight_decay, momentum, dampening, nesterov),
                     sgd_scalars<double>(grad_mult, effective_lr, weight_decay, momentum, dampening, nesterov)};
  const CpuKernels& kernels = cpu_kernels();
  chunks.parallel_for_chunks([&](int64_t c) { kernels.sgd_chunk(args, c); });
  if (momentum != 0.0) {
    for (const at::Tensor& flag : momentum_initialized) {
      flag.data_ptr<bool>()[0] = true;
    }
  }
}

}  // namespace gradfuse::cpu
