// clipped_adamw_step_'s update over one chunk, built once per CPU capability.
#include "../adamw_segment.h"
#include "../chunk_segments.h"
#include "../kernel_api.h"
#include "../storage_dispatch.h"

namespace gradfuse::cpu {
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN
namespace {

template <typename param_t, typename grad_t, bool kAmsgrad>
void adamw_chunk_typed(const AdamwArgs& args, int64_t chunk) {
  using math_t = at::opmath_type<param_t>;
  const AdamScalars<math_t>* scalars;
  if constexpr (std::is_same_v<math_t, double>) {
    scalars = args.double_scalars;
  } else {
    scalars = args.float_scalars;
  }
  for_each_segment(args.layout, chunk, [&](int64_t t, int64_t begin, int64_t end) {
    param_t* v_max = kAmsgrad ? static_cast<param_t*>(args.max_exp_avg_sqs[t]) + begin : nullptr;
    adamw_segment<param_t, grad_t, kAmsgrad>(
        static_cast<param_t*>(args.params[t]) + begin, static_cast<const grad_t*>(args.grads[t]) + begin,
        static_cast<param_t*>(args.exp_avgs[t]) + begin, static_cast<param_t*>(args.exp_avg_sqs[t]) + begin, v_max,
        end - begin, scalars[t]);
  });
}

template <typename param_t, typename grad_t>
void adamw_chunk_amsgrad(const AdamwArgs& args, int64_t chunk) {
  if (args.amsgrad) {
    adamw_chunk_typed<param_t, grad_t, true>(args, chunk);
  } else {
    adamw_chunk_typed<param_t, grad_t, false>(args, chunk);
  }
}

}  // namespace

// flatten: every helper is inlined here, so this build emits no shared copy of an inline function.
__attribute__((flatten)) void adamw_chunk(const AdamwArgs& args, int64_t chunk) {
  dispatch_storage(args.param_type, [&](auto param_tag) {
    using param_t = typename decltype(param_tag)::type;
    if constexpr (is_reduced_float_v<param_t>) {
      if (args.grad_type == c10::ScalarType::Float) {  // fp16/bf16 parameters, float32 accumulator
        adamw_chunk_amsgrad<param_t, float>(args, chunk);
        return;
      }
    }
    adamw_chunk_amsgrad<param_t, param_t>(args, chunk);
  });
}

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse::cpu
