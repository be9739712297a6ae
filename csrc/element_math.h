// Element math shared by the CPU loops and the CUDA kernels: one definition of every formula.
#pragma once

#include "cpu/capability_namespace.h"

#include <c10/macros/Macros.h>
#include <cmath>
#include <type_traits>

namespace gradfuse {

// Constant term torch.nn.utils.clip_grad_norm_ adds to the norm before dividing.
constexpr double kClipEpsilon = 1e-6;

// Per-pass scalars of the SGD update, already resolved on the device (clip, 1/K and
// maximize are folded into grad_mult so the hot loop does one multiply for them).
template <typename T>
struct SgdScalars {
  T grad_mult;
  T lr;
  T weight_decay;
  T momentum;
  T dampening_complement;  // 1 - dampening
  bool use_momentum;
  bool nesterov;
};

// Functions (not types) are per CPU capability: they are instantiated in every kernel build.
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN

// Math functions spelled for both compilers (host std:: and device built-ins).
C10_HOST_DEVICE inline bool is_finite(double x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

C10_HOST_DEVICE inline double abs_value(double x) {
#if defined(__CUDA_ARCH__)
  return fabs(x);
#else
  return std::fabs(x);
#endif
}

C10_HOST_DEVICE inline double square_root(double x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// a * b + c rounded once, for a scalar or an at::vec::Vectorized<float|double>: a true fused
// multiply-add in every build (the -ffp-contract=off / -fmad=false builds never fuse implicitly,
// so every fused operation is spelled here and every build gives the same bits).
template <typename V>
C10_HOST_DEVICE inline V fused_multiply_add(const V& a, const V& b, const V& c) {
  if constexpr (std::is_arithmetic_v<V>) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<V, float>) {
      return fmaf(a, b, c);
    } else {
      return fma(a, b, c);
    }
#else
    return std::fma(a, b, c);  // one vfmadd in the AVX2/AVX-512 builds, libm's exact fma otherwise
#endif
  } else {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#if !defined(__FMA__)
#error "the AVX2/AVX-512 kernel builds need FMA instructions (-mfma)"
#endif
    // ATen's Vectorized<float|double> specializations: _mm256/_mm512_fmadd_ps/pd (found by
    // argument-dependent lookup, so this header needs no ATen vector include).
    return fmadd(a, b, c);
#else
    // ATen's generic fmadd is a * b + c with two roundings: fuse lane by lane instead (a libm call
    // on a CPU without FMA hardware: slow, but this build only runs on such CPUs or when forced).
    using T = typename V::value_type;
    T x[V::size()], y[V::size()], z[V::size()];
    a.store(x);
    b.store(y);
    c.store(z);
    for (int i = 0; i < V::size(); ++i) {
      x[i] = std::fma(x[i], y[i], z[i]);
    }
    return V::loadu(x);
#endif
  }
}

// torch.optim.SGD's update for one element (V is a scalar or an at::vec::Vectorized), rounded as
// torch's CPU single-tensor SGD rounds it: every `x.add(y, alpha=a)` there is one fused
// multiply-add fma(y, a, x) (ATen's vectorized add), every mul one rounding.
template <typename V, typename T>
C10_HOST_DEVICE inline void sgd_update(
    V& param, V& momentum_buffer, V grad, const SgdScalars<T>& s, bool buffer_initialized) {
  V d = grad * V(s.grad_mult);  // exact for grad_mult = +-1 (torch: grad, or -grad when maximizing)
  if (s.weight_decay != T(0)) {
    d = fused_multiply_add(param, V(s.weight_decay), d);  // d.add(param, alpha=weight_decay)
  }
  if (s.use_momentum) {
    // torch.optim.SGD: the first update stores d itself, later ones blend with dampening:
    // buf.mul_(momentum).add_(d, alpha=1 - dampening).
    momentum_buffer = buffer_initialized
        ? fused_multiply_add(d, V(s.dampening_complement), momentum_buffer * V(s.momentum))
        : d;
    // d.add(buf, alpha=momentum) (nesterov), else buf.
    d = s.nesterov ? fused_multiply_add(momentum_buffer, V(s.momentum), d) : momentum_buffer;
  }
  param = fused_multiply_add(d, V(-s.lr), param);  // param.add_(d, alpha=-lr)
}

// Per-pass scalars of the AdamW update, in the math type. Those of the whole call (clip, 1/K,
// maximize folded into grad_mult as for SGD) come first; step_size and bias_correction2_sqrt
// depend on each tensor's own step and are set per tensor (adamw_tensor_scalars).
template <typename T>
struct AdamScalars {
  T grad_mult;        // (maximize ? -1 : 1) * grad_scale * clip
  T decay;            // 1 - lr * weight_decay: decoupled weight decay as one multiply
  T lerp_weight;      // 1 - beta1, the weight of exp_avg.lerp_(grad, 1 - beta1)
  T beta2;
  T beta2_complement; // 1 - beta2
  T eps;
  T step_size;              // lr / (1 - beta1^step)
  T bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};

// The step-dependent scalars of one tensor, formed in double and rounded once, as torch.optim's
// single-tensor Adam forms them from Python floats. `step` is the already incremented count.
template <typename T>
C10_HOST_DEVICE inline void adamw_tensor_scalars(AdamScalars<T>& s, double lr, double beta1, double beta2,
                                                 double step) {
#if defined(__CUDA_ARCH__)
  const double beta1_power = pow(beta1, step);
  const double beta2_power = pow(beta2, step);
#else
  const double beta1_power = std::pow(beta1, step);
  const double beta2_power = std::pow(beta2, step);
#endif
  s.step_size = static_cast<T>(lr / (1.0 - beta1_power));
  s.bias_correction2_sqrt = static_cast<T>(square_root(1.0 - beta2_power));
}

// Lane-wise square root and NaN-propagating maximum (torch.maximum) of a scalar or an
// at::vec::Vectorized; the vector forms are ATen's, found by argument-dependent lookup.
template <typename V>
C10_HOST_DEVICE inline V lane_sqrt(V x) {
  if constexpr (std::is_arithmetic_v<V>) {
#if defined(__CUDA_ARCH__)
    return sqrt(x);
#else
    return std::sqrt(x);
#endif
  } else {
    return x.sqrt();
  }
}

template <typename V>
C10_HOST_DEVICE inline V lane_max(V a, V b) {
  if constexpr (std::is_arithmetic_v<V>) {
    if (a != a) {
      return a;
    }
    return (b != b || b > a) ? b : a;
  } else {
    return maximum(a, b);
  }
}

// torch.lerp(start, end, weight) for a scalar weight, with torch's two formulas (the second
// keeps weights near 1 exact at the end point).
template <typename V, typename T>
C10_HOST_DEVICE inline V lerp_like_torch(V start, V end, T weight) {
  return weight < T(0.5) ? start + V(weight) * (end - start) : end - (end - start) * V(T(1) - weight);
}

// torch.optim.AdamW's update of one element (decoupled weight decay), V a scalar or an
// at::vec::Vectorized. max_exp_avg_sq is read and written only when kAmsgrad.
template <bool kAmsgrad, typename V, typename T>
C10_HOST_DEVICE inline void adamw_update(V& param, V& exp_avg, V& exp_avg_sq, V& max_exp_avg_sq, V grad,
                                         const AdamScalars<T>& s) {
  const V g = grad * V(s.grad_mult);
  param = param * V(s.decay);  // torch skips this when weight_decay == 0; x * 1 is x exactly
  exp_avg = lerp_like_torch(exp_avg, g, s.lerp_weight);
  exp_avg_sq = V(s.beta2) * exp_avg_sq + V(s.beta2_complement) * g * g;  // addcmul's (value * g) * g
  V second_moment = exp_avg_sq;
  if constexpr (kAmsgrad) {
    max_exp_avg_sq = lane_max(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const V denom = lane_sqrt(second_moment) / V(s.bias_correction2_sqrt) + V(s.eps);
  // torch: param.addcdiv_(exp_avg, denom, value=-step_size); -(a * m) / d is (-a * m) / d exactly.
  param = param - V(s.step_size) * exp_avg / denom;
}

// GradScaler's unscale factor, rounded to float32 exactly as torch.amp computes it.
C10_HOST_DEVICE inline float amp_inverse_scale(float scale) {
  return static_cast<float>(1.0 / static_cast<double>(scale));
}

// clip_grad_norm_'s factor min(1, max_norm / (norm + eps)); NaN stays NaN as in torch.
C10_HOST_DEVICE inline double clip_coefficient(double total_norm, double max_norm) {
  if (!(max_norm > 0.0)) {
    return 1.0;  // clipping disabled
  }
  const double coefficient = max_norm / (total_norm + kClipEpsilon);
  return coefficient > 1.0 ? 1.0 : coefficient;
}

// Whether the update must be skipped: a non-finite norm when skipping is on.
C10_HOST_DEVICE inline bool skip_update(double total_norm, bool skip_nonfinite) {
  return skip_nonfinite && !is_finite(total_norm);
}

// Contribution of one value to the running norm accumulator (sum of squares or max |x|).
C10_HOST_DEVICE inline double norm_combine(double running, double value, bool inf_norm) {
  if (!inf_norm) {
    return running + value * value;
  }
  const double magnitude = abs_value(value);
  // NaN must win so a NaN gradient makes the inf-norm NaN (plain max would drop it).
  return (magnitude > running || magnitude != magnitude) ? magnitude : running;
}

// Merge two partial accumulators of the same norm kind.
C10_HOST_DEVICE inline double norm_merge(double a, double b, bool inf_norm) {
  if (!inf_norm) {
    return a + b;
  }
  return (b > a || b != b) ? b : a;
}

// Total norm from the accumulator: sqrt for the 2-norm, then the 1/K (and any) scale.
C10_HOST_DEVICE inline double norm_finalize(double accumulated, bool nonfinite, bool inf_norm, double scale) {
  double norm = inf_norm ? accumulated : square_root(accumulated);
  norm *= scale;
  if (nonfinite && is_finite(norm)) {
    norm = NAN;  // a non-finite input was seen; never report a finite norm for it
  }
  return norm;
}

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse
