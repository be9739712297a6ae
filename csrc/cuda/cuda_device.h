// Device facts and device checks shared by the CUDA ops (plain C++: no CUDA headers needed).
#pragma once

#include <ATen/core/Tensor.h>

namespace gradfuse::cuda {

// Streaming multiprocessors of a device (cached per device: the attribute never changes).
int multiprocessor_count(int device);

// The device of a CUDA op call: must be a CUDA device (what names the offending tensor).
void check_cuda_device(const char* op, const char* name, const at::Device& device);

}  // namespace gradfuse::cuda
