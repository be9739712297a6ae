// Which build of the CPU kernels (csrc/cpu/kernels/) runs: the best one this CPU supports,
// chosen at the first call; GRADFUSE_CPU_CAPABILITY=default|avx2|avx512 forces one, and torch's
// own ATEN_CPU_CAPABILITY caps the choice.
#pragma once

#include "kernel_api.h"

#include <string>

namespace gradfuse::cpu {

// The kernels of the active capability.
const CpuKernels& cpu_kernels();

// The active capability's name: "default", "avx2" or "avx512".
std::string active_cpu_capability();

// Makes `name` the active capability (tests, benchmarks); throws if this build or CPU lacks it.
void set_cpu_capability(const std::string& name);

}  // namespace gradfuse::cpu
