// Running norm of a stream of values, kept in double lanes (one per vector lane) so squares of
// large float32 values never overflow and the summation order is fixed.
#pragma once

#include "../element_math.h"

#include <ATen/cpu/vec/vec.h>

namespace gradfuse::cpu {

template <typename math_t, bool kInfNorm>
struct NormAccumulator {
  static constexpr int kLanes = at::vec::Vectorized<math_t>::size();
  double lanes[kLanes] = {};

  inline void add(const at::vec::Vectorized<math_t>& v) {
    math_t values[kLanes];
    v.store(values);
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] = norm_combine(lanes[l], static_cast<double>(values[l]), kInfNorm);
    }
  }

  inline void add(math_t value) { lanes[0] = norm_combine(lanes[0], static_cast<double>(value), kInfNorm); }

  inline double total() const {
    double sum = lanes[0];
    for (int l = 1; l < kLanes; ++l) {
      sum = norm_merge(sum, lanes[l], kInfNorm);
    }
    return sum;
  }
};

// Adds one partial into a norm state [value, non-finite flag] (CPU memory).
inline void merge_into_norm_state(double* state, double partial, bool inf_norm) {
  state[0] = norm_merge(state[0], partial, inf_norm);
  if (!std::isfinite(partial)) {
    state[1] = 1.0;
  }
}

}  // namespace gradfuse::cpu
