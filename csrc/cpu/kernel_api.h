// The boundary between the op entry points (baseline code) and the hot loops, which are built
// once per CPU capability (csrc/cpu/kernels/). Only raw pointers and plain scalars cross it, so
// no inline ATen code is shared between builds for different instruction sets.
#pragma once

#include "../element_math.h"  // SgdScalars: types are shared, functions are per capability

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace gradfuse::cpu {

// Elements per chunk: large enough to amortise the call, small enough to balance 2..64 threads.
// Chunk boundaries depend only on the sizes, so per-chunk partials reduce reproducibly.
constexpr int64_t kChunkElements = 16384;

// A tensor list as one virtual concatenation: tensor t covers [offsets[t], offsets[t + 1]).
struct FlatLayout {
  const int64_t* offsets;
  int64_t num_tensors;
};

// Where a pass that keeps per-tensor norms writes the norm partial of each (chunk, tensor) piece:
// at segment_norms[tensor + chunk] (unique: chunks cover the tensors in order), or nowhere (null).
inline int64_t segment_slot(int64_t tensor, int64_t chunk) { return tensor + chunk; }

// acc = (first ? 0 : acc) + scale * grad; with_norm also returns the chunk's norm partial (and,
// with segment_norms, writes each piece's own partial).
struct AccumulateArgs {
  FlatLayout layout;
  void* const* accs;
  const void* const* grads;
  c10::ScalarType acc_type;
  c10::ScalarType grad_type;
  double scale;
  bool first;
  bool with_norm;
  bool inf_norm;
  double* segment_norms;
};

// The norm partial (sum of squares or max |x|, float64) of the chunk (and, with segment_norms,
// of each piece).
struct NormArgs {
  FlatLayout layout;
  const void* const* tensors;
  c10::ScalarType type;
  bool inf_norm;
  double* segment_norms;
};

// torch.optim.SGD's update; buffers/buffer_initialized are read only when use_momentum.
struct SgdArgs {
  FlatLayout layout;
  void* const* params;
  const void* const* grads;
  void* const* buffers;
  const char* buffer_initialized;  // per tensor
  c10::ScalarType param_type;
  c10::ScalarType grad_type;
  SgdScalars<float> float_scalars;    // float, float16 and bfloat16 parameters
  SgdScalars<double> double_scalars;  // float64 parameters
};

// torch.optim.AdamW's update; scalars are per tensor (each has its own step count), in the math
// type of the parameters; max_exp_avg_sqs is read only with amsgrad.
struct AdamwArgs {
  FlatLayout layout;
  void* const* params;
  const void* const* grads;
  void* const* exp_avgs;
  void* const* exp_avg_sqs;
  void* const* max_exp_avg_sqs;
  c10::ScalarType param_type;
  c10::ScalarType grad_type;
  bool amsgrad;
  const AdamScalars<float>* float_scalars;    // float, float16 and bfloat16 parameters
  const AdamScalars<double>* double_scalars;  // float64 parameters
};

// One CPU capability's kernels; each processes chunk `chunk` of its layout.
struct CpuKernels {
  double (*accumulate_chunk)(const AccumulateArgs& args, int64_t chunk);
  double (*norm_chunk)(const NormArgs& args, int64_t chunk);
  void (*sgd_chunk)(const SgdArgs& args, int64_t chunk);
  void (*adamw_chunk)(const AdamwArgs& args, int64_t chunk);
};

}  // namespace gradfuse::cpu
