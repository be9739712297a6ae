// Storage-type dispatch inside the kernels. The op entry points have already checked the dtypes;
// a plain switch keeps ATen's AT_DISPATCH error-reporting code out of every capability build.
#pragma once

#include "capability_namespace.h"

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdlib>

namespace gradfuse::cpu {
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN

template <typename T>
struct StorageTag {
  using type = T;
};

// Calls fn(StorageTag<T>{}) for the storage type T of `type` (float32/64, float16, bfloat16).
template <typename Fn>
inline void dispatch_storage(c10::ScalarType type, const Fn& fn) {
  switch (type) {
    case c10::ScalarType::Float:
      return fn(StorageTag<float>{});
    case c10::ScalarType::Double:
      return fn(StorageTag<double>{});
    case c10::ScalarType::Half:
      return fn(StorageTag<c10::Half>{});
    case c10::ScalarType::BFloat16:
      return fn(StorageTag<c10::BFloat16>{});
    default:
      std::abort();  // unreachable: the op checks reject every other dtype first
  }
}

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse::cpu
