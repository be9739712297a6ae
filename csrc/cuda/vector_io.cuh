// Packs of W consecutive elements moved with the widest aligned memory instructions (16B
// vectors; 32B packs split into two), plus where a segment's packs are aligned in every list.
#pragma once

#include "launch_plan.h"

#include <c10/macros/Macros.h>

#include <cstdint>

namespace gradfuse::cuda {

// Bytes of one vector memory instruction on sm_70..sm_90.
constexpr int kVectorBytes = 16;

template <typename T, typename... Ts>
constexpr int smallest_size() {
  if constexpr (sizeof...(Ts) == 0) {
    return static_cast<int>(sizeof(T));
  } else {
    constexpr int rest = smallest_size<Ts...>();
    return static_cast<int>(sizeof(T)) < rest ? static_cast<int>(sizeof(T)) : rest;
  }
}

// Elements per pack so that the narrowest type of an op fills one 16B vector.
template <typename... Ts>
constexpr int pack_width() {
  return kVectorBytes / smallest_size<Ts...>();
}

// W elements of T; 16B alignment at most, so a 32B pack (8 floats next to 8 halves) is two vectors.
template <typename T, int W>
struct alignas(sizeof(T) * W < kVectorBytes ? sizeof(T) * W : kVectorBytes) Pack {
  T val[W];
};

template <int W, typename T>
C10_DEVICE __forceinline__ Pack<T, W> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, W>*>(ptr);
}

template <int W, typename T>
C10_DEVICE __forceinline__ void store_pack(T* ptr, const Pack<T, W>& pack) {
  *reinterpret_cast<Pack<T, W>*>(ptr) = pack;
}

// Where packs of W elements are aligned in every list (see add_list_alignment).
template <int W, typename... Ts>
C10_DEVICE __forceinline__ PackAlignment pack_alignment(const Ts*... ptrs) {
  PackAlignment alignment{0, 1};
  ((alignment = add_list_alignment(alignment, reinterpret_cast<uintptr_t>(ptrs), sizeof(Ts), W)), ...);
  return alignment;
}

}  // namespace gradfuse::cuda
