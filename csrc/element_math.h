// Element math shared by the CPU loops and the CUDA kernels: one definition of every formula.
#pragma once

#include "cpu/capability_namespace.h"

#include <c10/macros/Macros.h>
#include <cmath>

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

// torch.optim.SGD's update for one element (V is a scalar or an at::vec::Vectorized).
template <typename V, typename T>
C10_HOST_DEVICE inline void sgd_update(
    V& param, V& momentum_buffer, V grad, const SgdScalars<T>& s, bool buffer_initialized) {
  V d = grad * V(s.grad_mult);
  if (s.weight_decay != T(0)) {
    d = d + V(s.weight_decay) * param;
  }
  if (s.use_momentum) {
    // torch.optim.SGD: the first update stores d itself, later ones blend with dampening.
    momentum_buffer = buffer_initialized
        ? V(s.momentum) * momentum_buffer + V(s.dampening_complement) * d
        : d;
    d = s.nesterov ? d + V(s.momentum) * momentum_buffer : momentum_buffer;
  }
  param = param - V(s.lr) * d;
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
