#include "cuda_device.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>

namespace gradfuse::cuda {

int multiprocessor_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device >= 0 && device < static_cast<int>(cache.size())) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) {
      return known;
    }
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < static_cast<int>(cache.size())) {
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

void check_cuda_device(const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(device.is_cuda(), op, ": ", name, " is on ", device,
                    "; this is the CUDA implementation, all tensors must be on one CUDA device");
}

}  // namespace gradfuse::cuda
