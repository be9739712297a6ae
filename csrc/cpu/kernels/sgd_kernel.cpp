// clipped_sgd_step_'s update over one chunk, built once per CPU capability.
#include "../chunk_segments.h"
#include "../kernel_api.h"
#include "../sgd_segment.h"
#include "../storage_dispatch.h"

namespace gradfuse::cpu {
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN
namespace {

template <typename param_t, typename grad_t>
void sgd_chunk_typed(const SgdArgs& args, int64_t chunk) {
  using math_t = at::opmath_type<param_t>;
  SgdScalars<math_t> s;
  if constexpr (std::is_same_v<math_t, double>) {
    s = args.double_scalars;
  } else {
    s = args.float_scalars;
  }
  for_each_segment(args.layout, chunk, [&](int64_t t, int64_t begin, int64_t end) {
    param_t* buffer = s.use_momentum ? static_cast<param_t*>(args.buffers[t]) + begin : nullptr;
    sgd_segment<param_t, grad_t>(static_cast<param_t*>(args.params[t]) + begin,
                                 static_cast<const grad_t*>(args.grads[t]) + begin, buffer, end - begin, s,
                                 s.use_momentum && args.buffer_initialized[t]);
  });
}

}  // namespace

// flatten: every helper is inlined here, so this build emits no shared copy of an inline function.
__attribute__((flatten)) void sgd_chunk(const SgdArgs& args, int64_t chunk) {
  dispatch_storage(args.param_type, [&](auto param_tag) {
    using param_t = typename decltype(param_tag)::type;
    if constexpr (is_reduced_float_v<param_t>) {
      if (args.grad_type == c10::ScalarType::Float) {  // fp16/bf16 parameters, float32 accumulator
        sgd_chunk_typed<param_t, float>(args, chunk);
        return;
      }
    }
    sgd_chunk_typed<param_t, param_t>(args, chunk);
  });
}

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse::cpu
