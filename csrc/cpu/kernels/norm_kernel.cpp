// accumulate_norm_'s read-only pass over one chunk, built once per CPU capability.
#include "../../static_switch.h"
#include "../chunk_segments.h"
#include "../kernel_api.h"
#include "../norm_accumulator.h"
#include "../storage_dispatch.h"

namespace gradfuse::cpu {
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN
namespace {

template <typename T, bool kInfNorm>
double norm_chunk_typed(const NormArgs& args, int64_t chunk) {
  NormAccumulator<T, kInfNorm> norm;
  for_each_segment(args.layout, chunk, [&](int64_t t, int64_t begin, int64_t end) {
    const T* data = static_cast<const T*>(args.tensors[t]) + begin;
    if (args.segment_norms == nullptr) {
      norm.template add_block</*kStreaming=*/true>(data, end - begin);
      return;
    }
    NormAccumulator<T, kInfNorm> piece_norm;  // block by block, so the piece is read once into L1
    for (int64_t block = 0; block < end - begin; block += kNormBlock) {
      const int64_t n = end - begin - block < kNormBlock ? end - begin - block : kNormBlock;
      norm.template add_block</*kStreaming=*/true>(data + block, n);
      piece_norm.add_block(data + block, n);
    }
    args.segment_norms[segment_slot(t, chunk)] = piece_norm.total();
  });
  return norm.total();
}

}  // namespace

// flatten: every helper is inlined here, so this build emits no shared copy of an inline function.
__attribute__((flatten)) double norm_chunk(const NormArgs& args, int64_t chunk) {
  double partial = 0.0;
  dispatch_storage(args.type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    partial = GRADFUSE_BOOL_SWITCH(args.inf_norm, kInfNorm, [&] { return norm_chunk_typed<T, kInfNorm>(args, chunk); });
  });
  return partial;
}

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse::cpu
