// Registers the CUDA kernels of the gradfuse ops (global_norm is backend independent).
#include "../ops.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(gradfuse, CUDA, m) {
  m.impl("accumulate_", &gradfuse::cuda::accumulate_);
  m.impl("accumulate_norm_", &gradfuse::cuda::accumulate_norm_);
  m.impl("finalize_norm_", &gradfuse::cuda::finalize_norm_);
  m.impl("clipped_sgd_step_", &gradfuse::cuda::clipped_sgd_step_);
  m.impl("clipped_adamw_step_", &gradfuse::cuda::clipped_adamw_step_);
}
