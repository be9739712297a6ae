// This capability's entry in the run-time kernel selection (cpu_capability.cpp).
#include "../capability_namespace.h"
#include "../kernel_api.h"

namespace gradfuse::cpu {
GRADFUSE_CAPABILITY_NAMESPACE_BEGIN

double accumulate_chunk(const AccumulateArgs& args, int64_t chunk);
double norm_chunk(const NormArgs& args, int64_t chunk);
void sgd_chunk(const SgdArgs& args, int64_t chunk);
void adamw_chunk(const AdamwArgs& args, int64_t chunk);

// Constant-initialised: no static constructor of a capability build runs at load time.
extern const CpuKernels kKernels;
const CpuKernels kKernels{&accumulate_chunk, &norm_chunk, &sgd_chunk, &adamw_chunk};

GRADFUSE_CAPABILITY_NAMESPACE_END
}  // namespace gradfuse::cpu
