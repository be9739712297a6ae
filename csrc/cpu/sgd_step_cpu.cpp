// finalize_norm_ and clipped_sgd_step_ on the CPU: the clip factor and skip decision are
// derived from the norm tensor inside the op, and the update is one sweep over the data.
#include "../element_math.h"
#include "../op_checks.h"
#include "../ops.h"
#include "../tensor_checks.h"
#include "flat_chunks.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

namespace gradfuse::cpu {
namespace {

template <typename param_t, typename grad_t>
void sgd_segment(param_t* param, const grad_t* grad, param_t* buffer, int64_t n,
                 // By value: the stores below may alias a referenced struct, forcing a reload of
                 // every scalar (and of the momentum switch) in each iteration.
                 const SgdScalars<at::opmath_type<param_t>> s, bool buffer_initialized) {
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
