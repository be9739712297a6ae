// Loads and stores between storage types and the vector type the math runs in
// (float for float/half/bfloat16 storage, double for double storage).
#pragma once

#include "capability_namespace.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace gradfuse::cpu {
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN

template <typename T>
using OpVec = at::vec::Vectorized<at::opmath_type<T>>;

template <typename T>
constexpr bool is_reduced_float_v = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

// Loads OpVec<math_t>::size() elements of storage type T as math_t lanes.
template <typename math_t, typename T>
inline at::vec::Vectorized<math_t> load_math(const T* ptr) {
  if constexpr (is_reduced_float_v<T>) {
    static_assert(std::is_same_v<math_t, float>, "half types are computed in float");
    at::vec::Vectorized<float> out;
    at::vec::load_to_float(ptr, out);
    return out;
  } else {
    static_assert(std::is_same_v<math_t, T>, "full-precision storage is computed in its own type");
    return at::vec::Vectorized<T>::loadu(ptr);
  }
}

// Stores the math lanes back to storage type T (rounding once for half types).
template <typename T, typename math_t>
inline void store_math(T* ptr, const at::vec::Vectorized<math_t>& v) {
  if constexpr (is_reduced_float_v<T>) {
    at::vec::convert_from_float<T>(v, v).store(ptr, at::vec::Vectorized<float>::size());
  } else {
    v.store(ptr);
  }
}

// Converts one stored element to math type (scalar tail loops).
template <typename math_t, typename T>
inline math_t to_math(T value) {
  return static_cast<math_t>(value);
}

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse::cpu
