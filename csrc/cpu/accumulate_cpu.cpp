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

}  // namespace

void accumulate_(at::TensorList accs, at::TensorList grads, double scale, bool first,
                 const std::optional<at::Tensor>& norm_state, double norm_type,
                 const std::optional<at::Tensor>& amp_scale) {
  check_accumulate_inputs(accs, grads, norm_state, norm_type, amp_scale, at::Device(at::kCPU));
  if (amp_scale.has_value()) {
    scale *= amp_inverse_scale(amp_scale->item<float>());  // CPU memory: no device sync
  }
  if (accs.empty()) {
    return;
  }
  const FlatChunks chunks(accs);
  const auto acc_ptrs = data_pointers<void>(accs);
  const auto grad_ptrs = data_pointers<const void>(grads);
  const AccumulateArgs args{chunks.layout(),          acc_ptrs.data(), grad_ptrs.data(),
                            accs[0].scalar_type(),    grads[0].scalar_type(), scale, first,
                            norm_state.has_value(),   is_inf_norm(norm_type)};
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
}

void accumulate_norm_(const at::Tensor& norm_state, at::TensorList tensors, double norm_type) {
  check_norm_inputs(norm_state, tensors, norm_type, at::Device(at::kCPU));
  if (tensors.empty()) {
    return;
  }
  const FlatChunks chunks(tensors);
  const auto pointers = data_pointers<const void>(tensors);
  const NormArgs args{chunks.layout(), pointers.data(), tensors[0].scalar_type(), is_inf_norm(norm_type)};
  std::vector<double> partials(chunks.num_chunks(), 0.0);
  const CpuKernels& kernels = cpu_kernels();
  chunks.parallel_for_chunks([&](int64_t c) { partials[c] = kernels.norm_chunk(args, c); });
  merge_partials(norm_state, partials, args.inf_norm);
}

}  // namespace gradfuse::cpu
