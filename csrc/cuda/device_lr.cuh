// The learning rate of an update kernel: a host value or a 1-element tensor read on the device
// (an LR scheduler's tensor lr never costs a host synchronisation).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

namespace gradfuse::cuda {

// Where the learning rate comes from: the host value or a 1-element device tensor of this dtype.
enum class LrSource : int { kValue, kFloat, kDouble, kHalf, kBFloat16 };

struct DeviceLr {
  const void* ptr;
  LrSource source;
  double value;

  __device__ __forceinline__ double read() const {
    switch (source) {
      case LrSource::kFloat:
        return static_cast<double>(*static_cast<const float*>(ptr));
      case LrSource::kDouble:
        return *static_cast<const double*>(ptr);
      case LrSource::kHalf:
        return static_cast<double>(static_cast<float>(*static_cast<const c10::Half*>(ptr)));
      case LrSource::kBFloat16:
        return static_cast<double>(static_cast<float>(*static_cast<const c10::BFloat16*>(ptr)));
      default:
        return value;
    }
  }
};

// The lr tensor read in place by the kernels (float dtypes), or a float64 copy made on the device.
inline DeviceLr resolve_lr(const std::optional<at::Tensor>& lr_tensor, double lr, at::Tensor& holder) {
  if (!lr_tensor.has_value()) {
    return DeviceLr{nullptr, LrSource::kValue, lr};
  }
  switch (lr_tensor->scalar_type()) {
    case at::kFloat:
      return DeviceLr{lr_tensor->const_data_ptr(), LrSource::kFloat, 0.0};
    case at::kDouble:
      return DeviceLr{lr_tensor->const_data_ptr(), LrSource::kDouble, 0.0};
    case at::kHalf:
      return DeviceLr{lr_tensor->const_data_ptr(), LrSource::kHalf, 0.0};
    case at::kBFloat16:
      return DeviceLr{lr_tensor->const_data_ptr(), LrSource::kBFloat16, 0.0};
    default:
      holder = lr_tensor->to(at::kDouble);  // other dtypes: an asynchronous device-side conversion
      return DeviceLr{holder.const_data_ptr(), LrSource::kDouble, 0.0};
  }
}

}  // namespace gradfuse::cuda
