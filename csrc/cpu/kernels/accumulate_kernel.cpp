// accumulate_'s sweep over one chunk, optionally taking the norm of what it stores; built once
// per CPU capability.
#include "../../static_switch.h"
#include "../chunk_segments.h"
#include "../kernel_api.h"
#include "../norm_accumulator.h"
#include "../storage_dispatch.h"
#include "../vec_io.h"

namespace gradfuse::cpu {
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN
namespace {

// acc = (first ? 0 : acc) + scale * grad over [0, n); the norm is then taken of each
// just-stored block while it is still in L1 (so it is the norm of exactly what was stored).
template <typename acc_t, typename grad_t, bool kFirst, bool kWithNorm, bool kPerTensor, typename Norm>
void accumulate_segment(acc_t* acc, const grad_t* grad, int64_t n, at::opmath_type<acc_t> scale, Norm& norm,
                        Norm& piece_norm) {
  using math_t = at::opmath_type<acc_t>;
  using Vec = at::vec::Vectorized<math_t>;
  const Vec scale_vec(scale);
  for (int64_t begin = 0; begin < n; begin += kNormBlock) {
    const int64_t end = n < begin + kNormBlock ? n : begin + kNormBlock;
    int64_t i = begin;
    for (; i + Vec::size() <= end; i += Vec::size()) {
      const Vec base = kFirst ? Vec(math_t(0)) : load_math<math_t>(acc + i);
      store_math(acc + i, base + scale_vec * load_math<math_t>(grad + i));
    }
    for (; i < end; ++i) {
      const math_t base = kFirst ? math_t(0) : to_math<math_t>(acc[i]);
      acc[i] = static_cast<acc_t>(base + scale * to_math<math_t>(grad[i]));
    }
    if constexpr (kWithNorm) {
      norm.add_block(acc + begin, end - begin);
      if constexpr (kPerTensor) {
        piece_norm.add_block(acc + begin, end - begin);  // the same block again, from L1
      }
    }
  }
}

template <typename acc_t, typename grad_t>
double accumulate_chunk_typed(const AccumulateArgs& args, int64_t chunk) {
  using math_t = at::opmath_type<acc_t>;
  const math_t scale = static_cast<math_t>(args.scale);
  return GRADFUSE_BOOL_SWITCH(args.first, kFirst, [&] {
    return GRADFUSE_BOOL_SWITCH(args.with_norm, kWithNorm, [&] {
      return GRADFUSE_BOOL_SWITCH(args.inf_norm, kInfNorm, [&] {
        return GRADFUSE_BOOL_SWITCH(kWithNorm && args.segment_norms != nullptr, kPerTensor, [&] {
          NormAccumulator<acc_t, kInfNorm> norm;
          for_each_segment(args.layout, chunk, [&](int64_t t, int64_t begin, int64_t end) {
            NormAccumulator<acc_t, kInfNorm> piece_norm;
            accumulate_segment<acc_t, grad_t, kFirst, kWithNorm, kPerTensor>(
                static_cast<acc_t*>(args.accs[t]) + begin, static_cast<const grad_t*>(args.grads[t]) + begin,
                end - begin, scale, norm, piece_norm);
            if constexpr (kPerTensor) {
              args.segment_norms[segment_slot(t, chunk)] = piece_norm.total();
            }
          });
          return kWithNorm ? norm.total() : 0.0;
        });
      });
    });
  });
}

}  // namespace

// flatten: every helper is inlined here, so this build emits no shared copy of an inline function.
__attribute__((flatten)) double accumulate_chunk(const AccumulateArgs& args, int64_t chunk) {
  double partial = 0.0;
  dispatch_storage(args.grad_type, [&](auto grad_tag) {
    using grad_t = typename decltype(grad_tag)::type;
    if constexpr (is_reduced_float_v<grad_t>) {
      if (args.acc_type == c10::ScalarType::Float) {  // fp16/bf16 gradients into a float32 accumulator
        partial = accumulate_chunk_typed<float, grad_t>(args, chunk);
        return;
      }
    }
    partial = accumulate_chunk_typed<grad_t, grad_t>(args, chunk);
  });
  return partial;
}

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse::cpu
