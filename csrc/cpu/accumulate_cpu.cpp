// accumulate_ and accumulate_norm_ on the CPU: checks, then one sweep by the kernels of the
// active CPU capability, optionally producing the norm.
#include "../element_math.h"
#include "../op_checks.h"
#include "../ops.h"
#include "../tensor_checks.h"
#include "cpu_capability.h"
#include "flat_chunks.h"

#include <cmath>
#include <vector>

namespace gradfuse::cpu {
namespace {

constexpr const char* kAccumulateName = "gradfuse::accumulate_";
constexpr const char* kNormName = "gradfuse::accumulate_norm_";

// Sums per-chunk partials in chunk order (independent of the thread count) into the state
// [value, non-finite flag] (CPU memory).
void merge_partials(const at::Tensor& norm_state, const std::vector<double>& partials, bool inf_norm) {
  double total = 0.0;
  for (double p : partials) {
    total = norm_merge(total, p, inf_norm);
  }
  double* state = norm_state.data_ptr<double>();
  state[0] = norm_merge(state[0], total, inf_norm);
  if (!std::isfinite(total)) {
    state[1] = 1.0;
  }
}

// Merges each tensor's piece partials (its chunks in order) into tensor_norms[t] (CPU float64).
void merge_pieces(const at::Tensor& tensor_norms, const std::vector<double>& pieces, const FlatLayout& layout,
                  bool inf_norm) {
  double* out = tensor_norms.data_ptr<double>();
  for (int64_t t = 0; t < layout.num_tensors; ++t) {
    if (layout.offsets[t + 1] == layout.offsets[t]) {
      continue;  // empty: no piece, its norm stays as it was
    }
    double total = 0.0;
    const int64_t last = (layout.offsets[t + 1] - 1) / kChunkElements;
    for (int64_t c = layout.offsets[t] / kChunkElements; c <= last; ++c) {
      total = norm_merge(total, pieces[segment_slot(t, c)], inf_norm);
    }
    out[t] = norm_merge(out[t], total, inf_norm);
  }
}

}  // namespace

void accumulate_(at::TensorList accs, at::TensorList grads, double scale, bool first,
                 const std::optional<at::Tensor>& norm_state, double norm_type,
                 const std::optional<at::Tensor>& amp_scale, const std::optional<at::Tensor>& tensor_norms) {
  check_accumulate_inputs(accs, grads, norm_state, norm_type, amp_scale, at::Device(at::kCPU));
  check_tensor_norms(kAccumulateName, tensor_norms, norm_state.has_value(), accs.size(), at::Device(at::kCPU));
  if (amp_scale.has_value()) {
    scale *= amp_inverse_scale(amp_scale->item<float>());  // CPU memory: no device sync
  }
  if (accs.empty()) {
    return;
  }
  const FlatChunks chunks(accs);
  const auto acc_ptrs = data_pointers<void>(accs);
  const auto grad_ptrs = data_pointers<const void>(grads);
  std::vector<double> pieces(tensor_norms.has_value() ? accs.size() + chunks.num_chunks() : 0, 0.0);
  const AccumulateArgs args{chunks.layout(),          acc_ptrs.data(), grad_ptrs.data(),
                            accs[0].scalar_type(),    grads[0].scalar_type(), scale, first,
                            norm_state.has_value(),   is_inf_norm(norm_type),
                            tensor_norms.has_value() ? pieces.data() : nullptr};
  std::vector<double> partials(args.with_norm ? chunks.num_chunks() : 0, 0.0);
  const CpuKernels& kernels = cpu_kernels();
  chunks.parallel_for_chunks([&](int64_t c) {
    const double partial = kernels.accumulate_chunk(args, c);
    if (args.with_norm) {
      partials[c] = partial;
    }
  });
  if (args.with_norm) {
    merge_partials(*norm_state, partials, args.inf_norm);
  }
  if (tensor_norms.has_value()) {
    merge_pieces(*tensor_norms, pieces, args.layout, args.inf_norm);
  }
}

void accumulate_norm_(const at::Tensor& norm_state, at::TensorList tensors, double norm_type,
                      const std::optional<at::Tensor>& tensor_norms) {
  check_norm_inputs(norm_state, tensors, norm_type, at::Device(at::kCPU));
  check_tensor_norms(kNormName, tensor_norms, true, tensors.size(), at::Device(at::kCPU));
  if (tensors.empty()) {
    return;
  }
  const FlatChunks chunks(tensors);
  const auto pointers = data_pointers<const void>(tensors);
  std::vector<double> pieces(tensor_norms.has_value() ? tensors.size() + chunks.num_chunks() : 0, 0.0);
  const NormArgs args{chunks.layout(), pointers.data(), tensors[0].scalar_type(), is_inf_norm(norm_type),
                      tensor_norms.has_value() ? pieces.data() : nullptr};
  std::vector<double> partials(chunks.num_chunks(), 0.0);
  const CpuKernels& kernels = cpu_kernels();
  chunks.parallel_for_chunks([&](int64_t c) { partials[c] = kernels.norm_chunk(args, c); });
  merge_partials(norm_state, partials, args.inf_norm);
  if (tensor_norms.has_value()) {
    merge_pieces(*tensor_norms, pieces, args.layout, args.inf_norm);
  }
}

}  // namespace gradfuse::cpu
