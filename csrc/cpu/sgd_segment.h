// The SGD update's hot loop over one contiguous run of elements: a vector body and a scalar tail
// running the same element math (sgd_update), instantiated once per CPU capability.
#pragma once

#include "../element_math.h"
#include "capability_namespace.h"
#include "vec_io.h"

#include <cstdint>

namespace gradfuse::cpu {
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN

// buffer is read and written only when s.use_momentum (it may be null otherwise).
template <typename param_t, typename grad_t>
inline void sgd_segment(param_t* param, const grad_t* grad, param_t* buffer, int64_t n,
                        // By value: the stores below may alias a referenced struct, forcing a
                        // reload of every scalar (and of the momentum switch) in each iteration.
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

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse::cpu
