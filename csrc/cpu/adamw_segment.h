// The AdamW update's hot loop over one contiguous run of elements: a vector body and a scalar
// tail that run the same element math (adamw_update), instantiated once per CPU capability.
#pragma once

#include "../element_math.h"
#include "capability_namespace.h"
#include "vec_io.h"

#include <cstdint>

namespace gradfuse::cpu {
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN

// max_exp_avg_sq is read and written only when kAmsgrad (it may be null otherwise).
template <typename param_t, typename grad_t, bool kAmsgrad>
inline void adamw_segment(param_t* param, const grad_t* grad, param_t* exp_avg, param_t* exp_avg_sq,
                   param_t* max_exp_avg_sq, int64_t n,
                   // By value: the stores below may alias a referenced struct, forcing a reload of
                   // every scalar in each iteration.
                   const AdamScalars<at::opmath_type<param_t>> s) {
  using math_t = at::opmath_type<param_t>;
  using Vec = at::vec::Vectorized<math_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec p = load_math<math_t>(param + i);
    Vec m = load_math<math_t>(exp_avg + i);
    Vec v = load_math<math_t>(exp_avg_sq + i);
    Vec v_max = kAmsgrad ? load_math<math_t>(max_exp_avg_sq + i) : Vec(math_t(0));
    adamw_update<kAmsgrad>(p, m, v, v_max, load_math<math_t>(grad + i), s);
    store_math(param + i, p);
    store_math(exp_avg + i, m);
    store_math(exp_avg_sq + i, v);
    if constexpr (kAmsgrad) {
      store_math(max_exp_avg_sq + i, v_max);
    }
  }
  for (; i < n; ++i) {
    math_t p = to_math<math_t>(param[i]);
    math_t m = to_math<math_t>(exp_avg[i]);
    math_t v = to_math<math_t>(exp_avg_sq[i]);
    math_t v_max = kAmsgrad ? to_math<math_t>(max_exp_avg_sq[i]) : math_t(0);
    adamw_update<kAmsgrad>(p, m, v, v_max, to_math<math_t>(grad[i]), s);
    param[i] = static_cast<param_t>(p);
    exp_avg[i] = static_cast<param_t>(m);
    exp_avg_sq[i] = static_cast<param_t>(v);
    if constexpr (kAmsgrad) {
      max_exp_avg_sq[i] = static_cast<param_t>(v_max);
    }
  }
}

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse::cpu
