// finalize_norm_ and clipped_sgd_step_ on the CPU: the clip factor and skip decision are
// derived from the norm tensor inside the op, and the update is one sweep over the data.
#include "../element_math.h"
#include "../ops.h"
#include "../tensor_checks.h"
#include "flat_chunks.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

namespace gradfuse::cpu {
namespace {

constexpr const char* kFinalizeOp = "gradfuse::finalize_norm_";
constexpr const char* kStepOp = "gradfuse::clipped_sgd_step_";

template <typename param_t, typename grad_t>
void sgd_segment(param_t* param, const grad_t* grad, param_t* buffer, int64_t n,
                 const SgdScalars<at::opmath_type<param_t>>& s, bool buffer_initialized) {
  using math_t = at::opmath_type<param_t>;
  using Vec = at::vec::Vectorized<math_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec p = load_math<math_t>(param + i);
    Vec b = s.use_momentum ? load_math<math_t>(buffer + i) : Vec(math_t(0));
    sgd_update(p, b, load_math<math_t>(grad + i), s, buffer_initialized);
    store_math(param + i, p);
    if (s.use_momentum) {
      store_math(buffer + i, b);
    }
  }
  for (; i < n; ++i) {
    math_t p = to_math<math_t>(param[i]);
    math_t b = s.use_momentum ? to_math<math_t>(buffer[i]) : math_t(0);
    sgd_update(p, b, to_math<math_t>(grad[i]), s, buffer_initialized);
    param[i] = static_cast<param_t>(p);
    if (s.use_momentum) {
      buffer[i] = static_cast<param_t>(b);
    }
  }
}

template <typename param_t, typename grad_t>
void sgd_step_typed(at::TensorList params, at::TensorList grads, at::TensorList buffers,
                    at::TensorList initialized, const SgdScalars<at::opmath_type<param_t>>& s) {
  const FlatChunks chunks(params);
  const auto param_ptrs = data_pointers<param_t>(params);
  const auto grad_ptrs = data_pointers<const grad_t>(grads);
  const auto buffer_ptrs = data_pointers<param_t>(buffers);
  std::vector<char> buffer_initialized(params.size(), 0);
  for (size_t t = 0; t < initialized.size(); ++t) {
    buffer_initialized[t] = *initialized[t].const_data_ptr<bool>();
  }
  chunks.parallel_for_chunks([&](int64_t c) {
    chunks.for_each_segment(c, [&](int64_t t, int64_t begin, int64_t end) {
      param_t* buffer = s.use_momentum ? buffer_ptrs[t] + begin : nullptr;
      sgd_segment<param_t, grad_t>(param_ptrs[t] + begin, grad_ptrs[t] + begin, buffer, end - begin, s,
                                   s.use_momentum && buffer_initialized[t]);
    });
  });
}

void check_step_inputs(at::TensorList params, at::TensorList grads, at::TensorList buffers,
                       at::TensorList initialized, const at::Tensor& total_norm,
                       const std::optional<at::Tensor>& lr_tensor, double momentum) {
  check_same_length(kStepOp, "grads", grads, "params", params);
  check_all_same_dtype(kStepOp, "params", params);
  check_all_same_dtype(kStepOp, "grads", grads);
  const bool use_momentum = momentum != 0.0;
  if (use_momentum) {
    check_same_length(kStepOp, "momentum_buffers", buffers, "params", params);
    check_same_length(kStepOp, "momentum_initialized", initialized, "params", params);
  }
  const at::Device device(at::kCPU);
  for (size_t i = 0; i < params.size(); ++i) {
    check_dense_float(kStepOp, "params", i, params[i]);
    TORCH_CHECK_VALUE(params[i].device() == device, kStepOp, ": params[", i, "] is on ", params[i].device(),
                      "; this is the CPU implementation");
    check_dense_float(kStepOp, "grads", i, grads[i]);
    check_same_layout(kStepOp, "grads", i, grads[i], "params", params[i]);
    if (use_momentum) {
      check_dense_float(kStepOp, "momentum_buffers", i, buffers[i]);
      check_dtype(kStepOp, "momentum_buffers", i, buffers[i], params[i].scalar_type());
      check_same_layout(kStepOp, "momentum_buffers", i, buffers[i], "params", params[i]);
      check_dtype(kStepOp, "momentum_initialized", i, initialized[i], at::kBool);
      check_scalar_tensor(kStepOp, "momentum_initialized", initialized[i], device);
    }
  }
  check_scalar_tensor(kStepOp, "total_norm", total_norm, device);
  check_dtype(kStepOp, "total_norm", 0, total_norm, at::kDouble);
  if (lr_tensor.has_value()) {
    check_scalar_tensor(kStepOp, "lr_tensor", *lr_tensor, device);
  }
  if (!params.empty()) {
    const at::ScalarType p = params[0].scalar_type();
    const at::ScalarType g = grads[0].scalar_type();
    TORCH_CHECK_TYPE(g == p || (g == at::kFloat && at::isReducedFloatingType(p)), kStepOp,
                     ": gradients of dtype ", g, " cannot update parameters of dtype ", p,
                     "; use the parameter dtype, or float32 for float16/bfloat16 parameters");
  }
}

}  // namespace

at::Tensor finalize_norm_(const at::Tensor& norm_state, const at::Tensor& skipped_steps, double norm_type,
                          double scale, bool count_nonfinite) {
  check_norm_type(kFinalizeOp, norm_type);
  check_norm_state(kFinalizeOp, norm_state, norm_state.device());
  TORCH_CHECK_VALUE(norm_state.device().is_cpu(), kFinalizeOp, ": this is the CPU implementation");
  check_scalar_tensor(kFinalizeOp, "skipped_steps", skipped_steps, norm_state.device());
  check_dtype(kFinalizeOp, "skipped_steps", 0, skipped_steps, at::kLong);
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
  check_step_inputs(params, grads, momentum_buffers, momentum_initialized, total_norm, lr_tensor, momentum);
  const double norm = total_norm.item<double>();  // CPU memory: no device synchronisation involved
  if (params.empty() || skip_update(norm, skip_nonfinite)) {
    return;
  }
  const double effective_lr = lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
  const double grad_mult = (maximize ? -1.0 : 1.0) * grad_scale * clip_coefficient(norm, max_norm);
  const at::ScalarType grad_type = grads[0].scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "gradfuse_sgd_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const SgdScalars<math_t> s{static_cast<math_t>(grad_mult), static_cast<math_t>(effective_lr),
                               static_cast<math_t>(weight_decay), static_cast<math_t>(momentum),
                               static_cast<math_t>(1.0 - dampening), momentum != 0.0, nesterov};
    if constexpr (is_reduced_float_v<scalar_t>) {
      if (grad_type == at::kFloat) {
        sgd_step_typed<scalar_t, float>(params, grads, momentum_buffers, momentum_initialized, s);
        return;
      }
    }
    sgd_step_typed<scalar_t, scalar_t>(params, grads, momentum_buffers, momentum_initialized, s);
  });
  if (momentum != 0.0) {
    for (const at::Tensor& flag : momentum_initialized) {
      flag.data_ptr<bool>()[0] = true;
    }
  }
}

}  // namespace gradfuse::cpu
