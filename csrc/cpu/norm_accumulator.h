// Running norm of a stream of values in double-precision vector lanes: squares of large float32
// values never overflow, and the summation order is fixed (bitwise reproducible).
#pragma once

#include "../element_math.h"
#include "vec_io.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#if defined(CPU_CAPABILITY_AVX2) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gradfuse::cpu {

using DoubleVec = at::vec::Vectorized<double>;

// The two double vectors holding the lanes of a float vector.
inline void widen(const at::vec::Vectorized<float>& v, DoubleVec& low, DoubleVec& high) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  low = DoubleVec(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
  high = DoubleVec(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
#else
  static_assert(at::vec::Vectorized<float>::size() == 2 * DoubleVec::size(), "float vector = two double vectors");
  float values[at::vec::Vectorized<float>::size()];
  v.store(values);
  double wide[at::vec::Vectorized<float>::size()];
  for (int i = 0; i < at::vec::Vectorized<float>::size(); ++i) {
    wide[i] = values[i];
  }
  low = DoubleVec::loadu(wide);
  high = DoubleVec::loadu(wide + DoubleVec::size());
#endif
}

// Elements per norm block: blocks let a fused pass take the norm of what it just stored while
// that is still in L1.
constexpr int64_t kNormBlock = 256;

// Two double vectors holding eight float32 values read straight from memory (no shuffle).
inline void load_widened(const float* data, DoubleVec& low, DoubleVec& high) {
#if defined(CPU_CAPABILITY_AVX2)
  low = DoubleVec(_mm256_cvtps_pd(_mm_loadu_ps(data)));
  high = DoubleVec(_mm256_cvtps_pd(_mm_loadu_ps(data + 4)));
#else
  widen(at::vec::Vectorized<float>::loadu(data), low, high);
#endif
}

// Norm of blocks of stored values, every square and sum in double: a float64 result whatever
// the storage type (fp64 parameters next to fp32 ones must not see a float-rounded norm), and
// 1e30-sized float32 values square without overflow.
template <typename math_t, bool kInfNorm>
struct NormAccumulator {
  using Vec = at::vec::Vectorized<math_t>;
  DoubleVec acc[4] = {DoubleVec(0.0), DoubleVec(0.0), DoubleVec(0.0), DoubleVec(0.0)};
  double scalar = 0.0;

  template <typename T>
  inline void add_block(const T* data, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> && !kInfNorm) {
      // One 8-float -> 8-double conversion per instruction: half the shuffle-port work of AVX2.
      // Full-mask maskz forms: the plain ones pass GCC an undefined vector it warns about.
      constexpr __mmask8 kAll8 = 0xFF;
      constexpr __mmask8 kAll4 = 0x0F;
      __m512d sum0 = _mm512_setzero_pd();
      __m512d sum1 = _mm512_setzero_pd();
      for (; i + 16 <= n; i += 16) {
        const __m512d low = _mm512_maskz_cvtps_pd(kAll8, _mm256_loadu_ps(data + i));
        const __m512d high = _mm512_maskz_cvtps_pd(kAll8, _mm256_loadu_ps(data + i + 8));
        sum0 = _mm512_add_pd(sum0, _mm512_mul_pd(low, low));
        sum1 = _mm512_add_pd(sum1, _mm512_mul_pd(high, high));
      }
      acc[0] = acc[0] + DoubleVec(_mm512_maskz_extractf64x4_pd(kAll4, sum0, 0));
      acc[1] = acc[1] + DoubleVec(_mm512_maskz_extractf64x4_pd(kAll4, sum0, 1));
      acc[2] = acc[2] + DoubleVec(_mm512_maskz_extractf64x4_pd(kAll4, sum1, 0));
      acc[3] = acc[3] + DoubleVec(_mm512_maskz_extractf64x4_pd(kAll4, sum1, 1));
    }
#endif
    for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
      if constexpr (std::is_same_v<T, double>) {
        acc[0] = combine(acc[0], DoubleVec::loadu(data + i));
        acc[1] = combine(acc[1], DoubleVec::loadu(data + i + Vec::size()));
      } else {
        DoubleVec v[4];
        if constexpr (std::is_same_v<T, float>) {
          load_widened(data + i, v[0], v[1]);
          load_widened(data + i + Vec::size(), v[2], v[3]);
        } else {
          widen(load_math<float>(data + i), v[0], v[1]);
          widen(load_math<float>(data + i + Vec::size()), v[2], v[3]);
        }
        for (int k = 0; k < 4; ++k) {  // fixed indices after unrolling: stays in registers
          acc[k] = combine(acc[k], v[k]);
        }
      }
    }
    for (; i < n; ++i) {
      scalar = norm_combine(scalar, static_cast<double>(static_cast<math_t>(data[i])), kInfNorm);
    }
  }

  // Lanes merged in a fixed order.
  inline double total() const {
    double sum = scalar;
    for (const DoubleVec& a : acc) {
      double lanes[DoubleVec::size()];
      a.store(lanes);
      for (double lane : lanes) {
        sum = norm_merge(sum, lane, kInfNorm);
      }
    }
    return sum;
  }

 private:
  static inline DoubleVec combine(const DoubleVec& running, const DoubleVec& x) {
    if constexpr (kInfNorm) {
      return at::vec::maximum(running, x.abs());  // propagates NaN, like norm_combine
    } else {
      return running + x * x;
    }
  }
};

// Feeds [0, n) of data to the accumulator in kNormBlock blocks.
template <typename T, typename Norm>
inline void add_norm_of(const T* data, int64_t n, Norm& norm) {
  for (int64_t begin = 0; begin < n; begin += kNormBlock) {
    norm.add_block(data + begin, std::min(kNormBlock, n - begin));
  }
}

// Adds one partial into a norm state [value, non-finite flag] (CPU memory).
inline void merge_into_norm_state(double* state, double partial, bool inf_norm) {
  state[0] = norm_merge(state[0], partial, inf_norm);
  if (!std::isfinite(partial)) {
    state[1] = 1.0;
  }
}

}  // namespace gradfuse::cpu
