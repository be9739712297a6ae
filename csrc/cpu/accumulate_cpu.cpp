// accumulate_ and accumulate_norm_ on the CPU: one sweep, optionally producing the norm.
#include "../op_checks.h"
#include "../ops.h"
#include "../static_switch.h"
#include "../tensor_checks.h"
#include "flat_chunks.h"
#include "norm_accumulator.h"
#include "vec_io.h"

#include <ATen/Dispatch.h>

namespace gradfuse::cpu {
namespace {

// acc = (first ? 0 : acc) + scale * grad over [0, n); the norm is then taken of each
// just-stored block while it is still in L1 (so it is the norm of exactly what was stored).
template <typename acc_t, typename grad_t, bool kFirst, bool kWithNorm, typename Norm>
void accumulate_segment(acc_t* acc, const grad_t* grad, int64_t n, at::opmath_type<acc_t> scale, Norm& norm) {
  using math_t = at::opmath_type<acc_t>;
  using Vec = at::vec::Vectorized<math_t>;
  const Vec scale_vec(scale);
  for (int64_t begin = 0; begin < n; begin += kNormBlock) {
    const int64_t end = std::min(n, begin + kNormBlock);
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      const Vec base = kFirst ? Vec(math_t(0)) : load_math<math_t>(acc + i);
      store_math(acc + i, base + scale_vec * load_math<math_t>(grad + i));
    }
    for (; i < end; ++i) {
      const math_t base = kFirst ? math_t(0) : to_math<math_t>(acc[i]);
      acc[i] = static_cast<acc_t>(base + scale * to_math<math_t>(grad[i]));
    }
    if constexpr (kWithNorm) {
      norm.add_block(acc + begin, end - begin);
    }
  }
}

// Sums per-chunk partials in chunk order (independent of the thread count) into the state.
void merge_partials(const at::Tensor& norm_state, const std::vector<double>& partials, bool inf_norm) {
  double total = 0.0;
  for (double p : partials) {
    total = norm_merge(total, p, inf_norm);
  }
  merge_into_norm_state(norm_state.data_ptr<double>(), total, inf_norm);
}

template <typename acc_t, typename grad_t>
void accumulate_typed(at::TensorList accs, at::TensorList grads, double scale, bool first,
                      const std::optional<at::Tensor>& norm_state, bool inf_norm) {
  using math_t = at::opmath_type<acc_t>;
  const FlatChunks chunks(accs);
  std::vector<double> partials(norm_state.has_value() ? chunks.num_chunks() : 0, 0.0);
  const auto acc_ptrs = data_pointers<acc_t>(accs);
  const auto grad_ptrs = data_pointers<const grad_t>(grads);
  GRADFUSE_BOOL_SWITCH(first, kFirst, [&] {
    GRADFUSE_BOOL_SWITCH(norm_state.has_value(), kWithNorm, [&] {
      GRADFUSE_BOOL_SWITCH(inf_norm, kInfNorm, [&] {
        chunks.parallel_for_chunks([&](int64_t c) {
          NormAccumulator<math_t, kInfNorm> norm;
          chunks.for_each_segment(c, [&](int64_t t, int64_t begin, int64_t end) {
            accumulate_segment<acc_t, grad_t, kFirst, kWithNorm>(acc_ptrs[t] + begin, grad_ptrs[t] + begin,
                                                                 end - begin, static_cast<math_t>(scale), norm);
          });
          if constexpr (kWithNorm) {
            partials[c] = norm.total();
          }
        });
      });
    });
  });
  if (norm_state.has_value()) {
    merge_partials(*norm_state, partials, inf_norm);
  }
}

}  // namespace

void accumulate_(at::TensorList accs, at::TensorList grads, double scale, bool first,
                 const std::optional<at::Tensor>& norm_state, double norm_type,
                 const std::optional<at::Tensor>& amp_scale) {
  check_accumulate_inputs(accs, grads, norm_state, norm_type, amp_scale, at::Device(at::kCPU));
  if (amp_scale.has_value()) {
    scale *= amp_inverse_scale(amp_scale->item<float>());  // CPU memory: no device sync
  }
  if (accs.empty()) {
    return;
  }
  const at::ScalarType acc_type = accs[0].scalar_type();
  const at::ScalarType grad_type = grads[0].scalar_type();
  const bool inf_norm = is_inf_norm(norm_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_type, "gradfuse_accumulate_cpu", [&] {
    if constexpr (is_reduced_float_v<scalar_t>) {
      if (acc_type == at::kFloat) {
        accumulate_typed<float, scalar_t>(accs, grads, scale, first, norm_state, inf_norm);
        return;
      }
    }
    accumulate_typed<scalar_t, scalar_t>(accs, grads, scale, first, norm_state, inf_norm);
  });
}

void accumulate_norm_(const at::Tensor& norm_state, at::TensorList tensors, double norm_type) {
  check_norm_inputs(norm_state, tensors, norm_type, at::Device(at::kCPU));
  if (tensors.empty()) {
    return;
  }
  const bool inf_norm = is_inf_norm(norm_type);
  const FlatChunks chunks(tensors);
  std::vector<double> partials(chunks.num_chunks(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "gradfuse_norm_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const auto pointers = data_pointers<const scalar_t>(tensors);
    GRADFUSE_BOOL_SWITCH(inf_norm, kInfNorm, [&] {
      chunks.parallel_for_chunks([&](int64_t c) {
        NormAccumulator<math_t, kInfNorm> norm;
        chunks.for_each_segment(c, [&](int64_t t, int64_t begin, int64_t end) {
          add_norm_of(pointers[t] + begin, end - begin, norm);
        });
        partials[c] = norm.total();
      });
    });
  });
  merge_partials(norm_state, partials, inf_norm);
}

}  // namespace gradfuse::cpu
