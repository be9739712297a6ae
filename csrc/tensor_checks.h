// Input checks at the op boundary: every message names the list, the index and the fix.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <string>

namespace gradfuse {

bool is_supported_float(at::ScalarType dtype);
// "[5, 4]" for a shape or strides. Messages use it instead of streaming c10::IntArrayRef through
// c10::str, which segfaulted under torch 2.11 (first GPU run, 2026-12-04).
std::string list_text(c10::IntArrayRef values);
bool is_inf_norm(double norm_type);  // after check_norm_type: true for inf, false for 2

void check_norm_type(const char* op, double norm_type);
void check_same_length(const char* op, const char* name, at::TensorList list, const char* ref_name,
                       at::TensorList ref);
// A dense (non-overlapping, gap-free) floating tensor the kernels can sweep as flat memory.
void check_dense_float(const char* op, const char* name, int64_t index, const at::Tensor& t);
// Same device, shape and memory layout as ref, so flat index i means the same element in both.
void check_same_layout(const char* op, const char* name, int64_t index, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref);
// t lives on device, the one device every tensor of an op call shares.
void check_on_device(const char* op, const char* name, int64_t index, const at::Tensor& t, const at::Device& device);
void check_dtype(const char* op, const char* name, int64_t index, const at::Tensor& t,
                 at::ScalarType expected);
void check_all_same_dtype(const char* op, const char* name, at::TensorList list);
void check_norm_state(const char* op, const at::Tensor& norm_state, const at::Device& device);
// GradScaler's scale: one float32 element on the tensors' device.
void check_amp_scale(const char* op, const at::Tensor& amp_scale, const at::Device& device);
void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t, const at::Device& device);

// What step() may do with each gradient, decided in one native pass (cheap for 1000s of tensors).
enum GradientCode : uint8_t {
  kNoGradient = 0,
  kAdoptable = 1,     // may become the accumulator itself: a plain tensor laid out like its parameter
  kCopyOnly = 2,      // usable, but must be copied (a view of other memory, or part of a graph)
  kNeedsRelayout = 3, // dense but laid out unlike its parameter: copy into the parameter's layout first
};

struct GradientReport {
  int64_t bad_index = -1;  // first unusable gradient, -1 when all are usable
  std::string reason;      // why it is unusable
  std::string codes;       // one GradientCode per parameter
};
// grads[i]: parameter i's gradient, or nullptr when it has none.
GradientReport inspect_gradients(const std::vector<at::Tensor>& params, const std::vector<const at::Tensor*>& grads);

}  // namespace gradfuse
