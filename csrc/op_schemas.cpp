// The gradfuse op schemas (defined once) and the backend-independent global_norm.
#include "ops.h"
#include "tensor_checks.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace gradfuse {
namespace {

// 0-dim float64 norm of a tensor list, built from the per-backend accumulate/finalize ops.
at::Tensor global_norm(at::TensorList tensors, double norm_type) {
  check_norm_type("gradfuse::global_norm", norm_type);
  TORCH_CHECK_VALUE(!tensors.empty(), "gradfuse::global_norm: tensors is empty; the norm of nothing is 0, "
                                      "call it with at least one tensor");
  static auto accumulate_norm = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("gradfuse::accumulate_norm_", "")
                                    .typed<void(const at::Tensor&, at::TensorList, double,
                                                const std::optional<at::Tensor>&)>();
  static auto finalize_norm = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("gradfuse::finalize_norm_", "")
                                  .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, double, bool)>();
  const auto options = tensors[0].options();
  at::Tensor state = at::zeros({kNormStateSize}, options.dtype(at::kDouble));
  at::Tensor unused_counter = at::zeros({}, options.dtype(at::kLong));
  accumulate_norm.call(state, tensors, norm_type, std::nullopt);
  return finalize_norm.call(state, unused_counter, norm_type, 1.0, false);
}

}  // namespace
}  // namespace gradfuse

TORCH_LIBRARY(gradfuse, m) {
  // accs[i] = (first ? 0 : accs[i]) + scale * grads[i]; with norm_state, also adds the
  // norm_type norm partial of the new accs and a non-finite flag into norm_state. amp_scale
  // (torch.amp.GradScaler's scale, 1 element) unscales on the fly: grads * float32(1 / amp_scale).
  // tensor_norms (float64, one per tensor; needs norm_state): each new acc's own partial is added
  // into its entry, from the same pass.
  m.def("accumulate_(Tensor(a!)[] accs, Tensor[] grads, float scale, bool first, Tensor(b!)? norm_state, "
        "float norm_type, Tensor? amp_scale=None, Tensor(c!)? tensor_norms=None) -> ()");
  // Adds the norm_type norm partial of tensors (and a non-finite flag) into norm_state, and
  // each tensor's own partial into tensor_norms when given.
  m.def("accumulate_norm_(Tensor(a!) norm_state, Tensor[] tensors, float norm_type, "
        "Tensor(b!)? tensor_norms=None) -> ()");
  // Total norm (0-dim float64) = root(norm_state) * scale; resets norm_state for the next
  // cycle and, when count_nonfinite, adds 1 to skipped_steps for a non-finite norm.
  m.def("finalize_norm_(Tensor(a!) norm_state, Tensor(b!) skipped_steps, float norm_type, float scale, "
        "bool count_nonfinite) -> Tensor");
  // Norm of a tensor list as a 0-dim float64 tensor (inf/nan when an element is).
  m.def("global_norm(Tensor[] tensors, float norm_type) -> Tensor");
  // One pass: clip factor and skip decision from total_norm, then torch.optim.SGD's update
  // of params and momentum_buffers with grads * grad_scale.
  m.def("clipped_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] momentum_initialized, Tensor total_norm, Tensor? lr_tensor, float lr, "
        "float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, "
        "float grad_scale, float max_norm, bool skip_nonfinite) -> ()");
  // One pass: clip factor and skip decision from total_norm as for SGD, then torch.optim.AdamW's
  // update of params and the moments with grads * grad_scale; each state_steps[i] (0-dim float32
  // or float64, on the params' device) is incremented unless the step is skipped, and tensor i's
  // bias corrections use its incremented value. max_exp_avg_sqs is used only with amsgrad.
  m.def("clipped_adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor total_norm, "
        "Tensor? lr_tensor, float lr, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
        "bool maximize, float grad_scale, float max_norm, bool skip_nonfinite) -> ()");
}

TORCH_LIBRARY_IMPL(gradfuse, CompositeExplicitAutograd, m) {
  m.impl("global_norm", &gradfuse::global_norm);
}

TORCH_LIBRARY_IMPL(gradfuse, CPU, m) {
  m.impl("accumulate_", &gradfuse::cpu::accumulate_);
  m.impl("accumulate_norm_", &gradfuse::cpu::accumulate_norm_);
  m.impl("finalize_norm_", &gradfuse::cpu::finalize_norm_);
  m.impl("clipped_sgd_step_", &gradfuse::cpu::clipped_sgd_step_);
  m.impl("clipped_adamw_step_", &gradfuse::cpu::clipped_adamw_step_);
}
