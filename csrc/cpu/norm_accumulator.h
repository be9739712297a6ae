// Running norm of a stream of values in float64 vector lanes: squares of large float32 values
// never overflow, and the summation order is fixed and the same for every CPU capability, so the
// norm's bits depend neither on the thread count nor on the instruction set.
#pragma once

#include "../element_math.h"
#include "capability_namespace.h"
#include "vec_io.h"

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace gradfuse::cpu {
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN

using DoubleVec = at::vec::Vectorized<double>;

// The 2-norm's summation order: within one add_block call, element j of every full run of
// kNormLanes values is added to float64 lane j; the remaining values go, in order, to a tail
// sum; total() = tail + lane 0 + ... + lane 31. 32 lanes give 4 (AVX-512) or 8 (AVX2) independent
// add chains, enough to hide the add latency behind the loads. Where a lane sits in the vectors
// depends on the storage type (see lane_slot); which elements it sums, and in what order, does not.
constexpr int64_t kNormLanes = 32;
constexpr int kNormVecs = static_cast<int>(kNormLanes / DoubleVec::size());
static_assert(kNormVecs % 2 == 0, "lanes are filled two vectors (one float vector) at a time");

// Elements per norm block of a fused pass, which takes the norm of what it just stored while that
// is still in L1. A multiple of kNormLanes, so blocks do not change the summation order.
constexpr int64_t kNormBlock = 256;
static_assert(kNormBlock % kNormLanes == 0, "blocks must not split a run of lanes");

// How far ahead a streaming norm pass prefetches. The widening makes the loop issue its loads
// more slowly than a plain sum, and the hardware prefetchers then keep fewer lines in flight: measured
// on a 2-thread Xeon VM, 84% of x.sum()'s bandwidth without, 100% with (2 KB ahead, 512 B to 4 KB alike).
constexpr int64_t kPrefetchBytes = 2048;

// bfloat16 is widened as pairs read as 32-bit words (the odd element is the high half, already a
// float32; the even one is the low half shifted up): no zero-extending shuffle, but the vectors then
// hold even elements in `low` and odd ones in `high`.
template <typename T>
constexpr bool kEvenOddLanes = std::is_same_v<T, c10::BFloat16>;

// Where logical lane j of storage type T sits in the accumulator's vectors (as stored to memory).
template <typename T>
constexpr int64_t lane_slot(int64_t j) {
  if constexpr (kEvenOddLanes<T>) {
    constexpr int64_t kWidth = DoubleVec::size();
    const int64_t pair = j % (2 * kWidth);
    return j - pair + (pair % 2) * kWidth + pair / 2;
  } else {
    return j;
  }
}

// 2 * DoubleVec::size() consecutive values of storage type T, widened exactly to float64: the
// first half to `low`, the second to `high` (bfloat16: even-indexed to `low`, odd to `high`).
template <typename T>
inline void load_widened(const T* data, DoubleVec& low, DoubleVec& high) {
  constexpr bool kHalf = std::is_same_v<T, c10::Half>;
  constexpr bool kBFloat16 = std::is_same_v<T, c10::BFloat16>;
  static_assert(std::is_same_v<T, float> || kHalf || kBFloat16, "float64 storage needs no widening");
#if defined(CPU_CAPABILITY_AVX512)
  // Full-mask maskz forms: the plain ones hand GCC an undefined vector it warns about.
  constexpr __mmask8 kAll = 0xFF;
  __m256 first;
  __m256 second;
  if constexpr (kHalf) {
    first = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data)));
    second = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data + 8)));
  } else if constexpr (kBFloat16) {  // bfloat16 is the top half of a float32
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data));
    first = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
    second = _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else {
    first = _mm256_loadu_ps(data);
    second = _mm256_loadu_ps(data + 8);
  }
  low = DoubleVec(_mm512_maskz_cvtps_pd(kAll, first));
  high = DoubleVec(_mm512_maskz_cvtps_pd(kAll, second));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {  // conversions straight from memory: no shuffle
    low = DoubleVec(_mm256_cvtps_pd(_mm_loadu_ps(data)));
    high = DoubleVec(_mm256_cvtps_pd(_mm_loadu_ps(data + 4)));
  } else if constexpr (kBFloat16) {  // 128-bit halves convert without an extract
    const __m128i words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(data));
    low = DoubleVec(_mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(words, 16))));
    const __m128i odd = _mm_and_si128(words, _mm_set1_epi32(static_cast<int>(0xFFFF0000u)));
    high = DoubleVec(_mm256_cvtps_pd(_mm_castsi128_ps(odd)));
  } else {
    const __m256 values = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(data)));
    low = DoubleVec(_mm256_cvtps_pd(_mm256_castps256_ps128(values)));
    high = DoubleVec(_mm256_cvtps_pd(_mm256_extractf128_ps(values, 1)));
  }
#else
  double wide[2 * DoubleVec::size()];
  for (int i = 0; i < 2 * DoubleVec::size(); ++i) {
    wide[lane_slot<T>(i)] = static_cast<double>(static_cast<float>(data[i]));
  }
  low = DoubleVec::loadu(wide);
  high = DoubleVec::loadu(wide + DoubleVec::size());
#endif
}

// Norm of blocks of stored values, every square and sum in float64: a float64 result whatever the
// storage type (fp64 parameters next to fp32 ones must not see a float-rounded norm), and
// 1e30-sized float32 values square without overflow.
// T: the one storage type fed to add_block, which fixes where each lane sits (lane_slot).
template <typename T, bool kInfNorm>
struct NormAccumulator {
  DoubleVec lanes[kNormVecs];
  double tail = 0.0;

  NormAccumulator() {
    for (DoubleVec& lane : lanes) {
      lane = DoubleVec(0.0);
    }
  }

  // kStreaming: data comes from memory, not from L1 (see kPrefetchBytes).
  template <bool kStreaming = false>
  inline void add_block(const T* data, int64_t n) {
    constexpr int64_t kWidth = DoubleVec::size();
    constexpr int64_t kLineElements = 64 / sizeof(T);
    DoubleVec acc[kNormVecs];  // locals: stay in registers across the loop
    for (int k = 0; k < kNormVecs; ++k) {
      acc[k] = lanes[k];
    }
    int64_t i = 0;
    for (; i + kNormLanes <= n; i += kNormLanes) {
      if constexpr (kStreaming) {
        for (int64_t line = 0; line < kNormLanes; line += kLineElements) {  // never faults past the end
          __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(data + i + line) + kPrefetchBytes), 0, 3);
        }
      }
      for (int k = 0; k < kNormVecs; k += 2) {  // fixed indices after unrolling
        DoubleVec low;
        DoubleVec high;
        if constexpr (std::is_same_v<T, double>) {
          low = DoubleVec::loadu(data + i + k * kWidth);
          high = DoubleVec::loadu(data + i + (k + 1) * kWidth);
        } else {
          load_widened(data + i + k * kWidth, low, high);
        }
        acc[k] = combine(acc[k], low);
        acc[k + 1] = combine(acc[k + 1], high);
      }
    }
    for (int k = 0; k < kNormVecs; ++k) {
      lanes[k] = acc[k];
    }
    for (; i < n; ++i) {
      tail = norm_combine(tail, static_cast<double>(to_math<at::opmath_type<T>>(data[i])), kInfNorm);
    }
  }

  // tail, then lanes 0..kNormLanes-1 in order.
  inline double total() const {
    double values[kNormLanes];
    for (int k = 0; k < kNormVecs; ++k) {
      lanes[k].store(values + k * DoubleVec::size());
    }
    double sum = tail;
    for (int64_t j = 0; j < kNormLanes; ++j) {
      sum = norm_merge(sum, values[lane_slot<T>(j)], kInfNorm);
    }
    return sum;
  }

 private:
  static inline DoubleVec combine(const DoubleVec& running, const DoubleVec& x) {
    if constexpr (kInfNorm) {
      return at::vec::maximum(running, x.abs());  // propagates NaN, like norm_combine
    } else if constexpr (!std::is_same_v<T, double>) {
      // A widened float squares exactly in float64 (at most 48 significant bits), so one fused
      // multiply-add rounds exactly like running + x * x: same bits, one instruction fewer.
#if defined(CPU_CAPABILITY_AVX512)
      return DoubleVec(_mm512_fmadd_pd(x, x, running));
#elif defined(CPU_CAPABILITY_AVX2)
      return DoubleVec(_mm256_fmadd_pd(x, x, running));
#else
      return running + x * x;
#endif
    } else {
      return running + x * x;
    }
  }
};

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse::cpu
