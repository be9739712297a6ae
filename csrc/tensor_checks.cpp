#include "tensor_checks.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace gradfuse {

bool is_supported_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

std::string list_text(c10::IntArrayRef values) {
  std::string text = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    text += (i == 0 ? "" : ", ") + std::to_string(values[i]);
  }
  return text + "]";
}

bool is_inf_norm(double norm_type) { return std::isinf(norm_type); }

void check_norm_type(const char* op, double norm_type) {
  TORCH_CHECK_VALUE(norm_type == 2.0 || (std::isinf(norm_type) && norm_type > 0), op,
                    ": norm_type must be 2.0 or inf, got ", norm_type);
}

void check_same_length(const char* op, const char* name, at::TensorList list, const char* ref_name,
                       at::TensorList ref) {
  TORCH_CHECK_VALUE(list.size() == ref.size(), op, ": ", name, " has ", list.size(), " tensors but ",
                    ref_name, " has ", ref.size(), "; they must pair up one to one");
}

void check_dense_float(const char* op, const char* name, int64_t index, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, "[", index, "] is undefined");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name, "[", index, "] has layout ", t.layout(),
                    "; gradfuse supports dense (strided) tensors only");
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name, "[", index, "] has dtype ",
                   t.scalar_type(), "; supported are float32, float64, float16 and bfloat16");
  TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), op, ": ", name, "[", index,
                    "] is not dense in memory (a strided view, an expanded or overlapping tensor); "
                    "pass a contiguous tensor");
}

void check_same_layout(const char* op, const char* name, int64_t index, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, "[", index, "] is on ", t.device(),
                    " but ", ref_name, "[", index, "] is on ", ref.device());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, "[", index, "] has shape ", list_text(t.sizes()),
                    " but ", ref_name, "[", index, "] has shape ", list_text(ref.sizes()));
  TORCH_CHECK_VALUE(t.numel() <= 1 || t.strides() == ref.strides(), op, ": ", name, "[", index,
                    "] has strides ", list_text(t.strides()), " but ", ref_name, "[", index,
                    "] has strides ", list_text(ref.strides()), "; both must share one memory layout");
}

void check_on_device(const char* op, const char* name, int64_t index, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, "[", index, "] is on ", t.device(), " but the ",
                    "call runs on ", device, "; all tensors of one call must be on one device");
}

void check_dtype(const char* op, const char* name, int64_t index, const at::Tensor& t,
                 at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": ", name, "[", index, "] has dtype ",
                   t.scalar_type(), " but ", expected, " is required here");
}

void check_all_same_dtype(const char* op, const char* name, at::TensorList list) {
  for (size_t i = 1; i < list.size(); ++i) {
    check_dtype(op, name, static_cast<int64_t>(i), list[i], list[0].scalar_type());
  }
}

void check_norm_state(const char* op, const at::Tensor& norm_state, const at::Device& device) {
  TORCH_CHECK_VALUE(norm_state.scalar_type() == at::kDouble && norm_state.dim() == 1 &&
                        norm_state.numel() == 2 && norm_state.is_contiguous(),
                    op, ": norm_state must be a contiguous float64 tensor of shape [2], got ",
                    norm_state.scalar_type(), " ", list_text(norm_state.sizes()));
  TORCH_CHECK_VALUE(norm_state.device() == device, op, ": norm_state is on ", norm_state.device(),
                    " but the tensors are on ", device);
}

void check_amp_scale(const char* op, const at::Tensor& amp_scale, const at::Device& device) {
  check_scalar_tensor(op, "amp_scale", amp_scale, device);
  TORCH_CHECK_TYPE(amp_scale.scalar_type() == at::kFloat, op, ": amp_scale must be float32 (GradScaler's scale), got ",
                   amp_scale.scalar_type());
}

void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.numel() == 1, op, ": ", name, " must hold exactly one element, got shape ",
                    list_text(t.sizes()));
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but the tensors are on ",
                    device);
}

namespace {

// Two slots holding one gradient storage (p2.grad = p1.grad) must not both become accumulators:
// each later addition would land twice. Every holder after the first (by slot) is copied.
void demote_shared_adoptions(const std::vector<const at::Tensor*>& grads, std::string& codes) {
  std::vector<std::pair<const void*, size_t>> adopted;
  for (size_t i = 0; i < codes.size(); ++i) {
    if (codes[i] != static_cast<char>(kAdoptable) || grads[i]->numel() == 0 || !grads[i]->has_storage()) {
      continue;
    }
    const void* data = grads[i]->storage().data();  // adoptable: storage offset 0, not a view
    if (data != nullptr) {  // meta tensors have no memory to share
      adopted.emplace_back(data, i);
    }
  }
  std::sort(adopted.begin(), adopted.end());
  for (size_t k = 1; k < adopted.size(); ++k) {
    if (adopted[k].first == adopted[k - 1].first) {
      codes[adopted[k].second] = static_cast<char>(kCopyOnly);
    }
  }
}

// Why gradient g cannot serve parameter p, or "" (a message is formatted only for a bad one: a
// string stream per gradient would dominate a step over thousands of tensors).
std::string gradient_problem(const at::Tensor& p, const at::Tensor& g) {
  if (g.layout() != at::kStrided) {
    return c10::str("has a ", g.layout(), " gradient; gradfuse supports dense gradients only");
  }
  if (g.scalar_type() != p.scalar_type()) {
    return c10::str("has a gradient of dtype ", g.scalar_type(), " but the parameter is ", p.scalar_type());
  }
  if (g.device() != p.device()) {
    return c10::str("has its gradient on ", g.device(), " but the parameter is on ", p.device());
  }
  if (g.sizes() != p.sizes()) {
    return "has a gradient of shape " + list_text(g.sizes()) + " but the parameter has shape " +
           list_text(p.sizes());
  }
  if (!g.is_non_overlapping_and_dense()) {
    return "has a gradient that is not dense in memory (strides " + list_text(g.strides()) +
           "); gradfuse needs gradients laid out like their parameters";
  }
  return std::string();
}

}  // namespace

GradientReport inspect_gradients(const std::vector<at::Tensor>& params, const std::vector<const at::Tensor*>& grads) {
  GradientReport report;
  report.codes.assign(params.size(), static_cast<char>(kNoGradient));
  TORCH_CHECK_VALUE(params.size() == grads.size(), "inspect_gradients: ", params.size(), " params but ",
                    grads.size(), " gradients");
  for (size_t i = 0; i < params.size(); ++i) {
    if (grads[i] == nullptr || !grads[i]->defined()) {
      continue;
    }
    const at::Tensor& p = params[i];
    const at::Tensor& g = *grads[i];
    const std::string why = gradient_problem(p, g);
    if (!why.empty()) {
      report.bad_index = static_cast<int64_t>(i);
      report.reason = why;
      return report;
    }
    GradientCode code = kAdoptable;
    if (g.numel() > 1 && g.strides() != p.strides()) {
      code = kNeedsRelayout;
    } else if (g.is_view() || g.requires_grad() || g.storage_offset() != 0) {
      code = kCopyOnly;  // its memory may belong to someone else (e.g. a DDP bucket view)
    }
    report.codes[i] = static_cast<char>(code);
  }
  demote_shared_adoptions(grads, report.codes);
  return report;
}

}  // namespace gradfuse
