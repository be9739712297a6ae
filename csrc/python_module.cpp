// The gradfuse._C Python module: loading it registers the ops; it also exposes the
// native gradient inspection the optimizer runs before touching any state.
#include "tensor_checks.h"

#include <torch/extension.h>

namespace {

// First parameter that gradfuse cannot update, as (index, reason); (-1, "") when all can.
std::pair<int64_t, std::string> inspect_parameters(const std::vector<at::Tensor>& params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    std::string reason;
    if (p.layout() != at::kStrided) {
      reason = "is not a dense (strided) tensor";
    } else if (p.is_complex()) {
      reason = "is complex; FusedAccumSGD supports real floating-point parameters only (view complex "
               "parameters with torch.view_as_real)";
    } else if (!gradfuse::is_supported_float(p.scalar_type())) {
      reason = std::string("has dtype ") + c10::toString(p.scalar_type()) +
               "; supported are float32, float64, float16 and bfloat16";
    } else if (!p.is_non_overlapping_and_dense()) {
      reason = "is not dense in memory (a strided, expanded or overlapping view); pass a contiguous tensor";
    }
    if (!reason.empty()) {
      return {static_cast<int64_t>(i), reason};
    }
  }
  return {-1, std::string()};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gradfuse native ops (registered under torch.ops.gradfuse)";
  m.def("inspect_parameters", &inspect_parameters, "First unusable parameter as (index, reason)");
  m.def(
      "inspect_gradients",
      [](const std::vector<at::Tensor>& params, const std::vector<std::optional<at::Tensor>>& grads) {
        auto report = gradfuse::inspect_gradients(params, grads);
        return std::make_tuple(report.bad_index, report.reason, py::bytes(report.codes));
      },
      "First unusable gradient as (index, reason, bytes of one GradientCode per parameter)");
#ifdef GRADFUSE_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
}
