// The pieces of tensors that one chunk of a FlatLayout covers (kernel side).
#pragma once

#include "capability_namespace.h"
#include "kernel_api.h"

namespace gradfuse::cpu {
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN

// Calls segment(tensor_index, begin, end) for every piece of a tensor inside the chunk, in order.
template <typename Segment>
inline void for_each_segment(const FlatLayout& layout, int64_t chunk, const Segment& segment) {
  const int64_t* offsets = layout.offsets;
  const int64_t lo = chunk * kChunkElements;
  const int64_t hi = lo + kChunkElements < offsets[layout.num_tensors] ? lo + kChunkElements
                                                                       : offsets[layout.num_tensors];
  // Last tensor starting at or before lo (binary search; empty tensors are skipped below).
  int64_t first = 0;
  int64_t count = layout.num_tensors;
  while (count > 0) {
    const int64_t half = count / 2;
    if (offsets[first + half + 1] <= lo) {
      first += half + 1;
      count -= half + 1;
    } else {
      count = half;
    }
  }
  for (int64_t t = first; t < layout.num_tensors && offsets[t] < hi; ++t) {
    const int64_t start = lo > offsets[t] ? lo : offsets[t];
    const int64_t stop = hi < offsets[t + 1] ? hi : offsets[t + 1];
    if (stop > start) {
      segment(t, start - offsets[t], stop - offsets[t]);
    }
  }
}

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse::cpu
