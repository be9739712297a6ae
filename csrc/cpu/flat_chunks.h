// Splits a tensor list into fixed-size chunks of its virtual concatenation and runs them in
// parallel. Chunk boundaries depend only on the sizes, never on the thread count, so
// per-chunk partial results reduced in chunk order are bitwise reproducible.
#pragma once

#include "kernel_api.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <vector>

namespace gradfuse::cpu {

class FlatChunks {
 public:
  explicit FlatChunks(at::TensorList tensors) : offsets_(tensors.size() + 1, 0) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      offsets_[i + 1] = offsets_[i] + tensors[i].numel();
    }
  }

  int64_t total_elements() const { return offsets_.back(); }
  int64_t num_chunks() const { return (total_elements() + kChunkElements - 1) / kChunkElements; }

  // The layout the kernels walk (valid while this object lives).
  FlatLayout layout() const { return FlatLayout{offsets_.data(), static_cast<int64_t>(offsets_.size()) - 1}; }

  // Runs chunk_fn(chunk) for every chunk, in parallel when there is enough work.
  template <typename ChunkFn>
  void parallel_for_chunks(const ChunkFn& chunk_fn) const {
    // 16 chunks (256K elements) per task: waking a sleeping OpenMP worker costs 30-50 us on a
    // 2-core VM, more than a thread takes for 256K elements, so smaller passes stay on one thread.
    constexpr int64_t kGrainChunks = 16;
    at::parallel_for(0, num_chunks(), kGrainChunks, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        chunk_fn(c);
      }
    });
  }

 private:
  std::vector<int64_t> offsets_;
};

// Raw data pointers of a tensor list, read once so the per-chunk loops do no checked lookups.
template <typename T>
std::vector<T*> data_pointers(at::TensorList tensors) {
  std::vector<T*> pointers(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    pointers[i] = static_cast<T*>(tensors[i].data_ptr());
  }
  return pointers;
}

}  // namespace gradfuse::cpu
