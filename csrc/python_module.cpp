// The gradfuse._C Python module: loading it registers the ops; it also exposes the
// native gradient inspection the optimizer runs before touching any state.
#include "launch_plan_python.h"
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

// Inspects the gradients of a fixed parameter list once per step; the parameters are converted
// once at construction and the gradients straight from the Python list (the per-step hot path).
class GradientInspector {
 public:
  explicit GradientInspector(std::vector<at::Tensor> params) : params_(std::move(params)) {}

  py::tuple inspect(const py::list& grads) const {
    TORCH_CHECK_VALUE(grads.size() == params_.size(), "GradientInspector: ", grads.size(), " gradients for ",
                      params_.size(), " parameters");
    std::vector<std::optional<at::Tensor>> unpacked(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      PyObject* item = PyList_GET_ITEM(grads.ptr(), static_cast<Py_ssize_t>(i));
      if (item == Py_None) {
        continue;
      }
      TORCH_CHECK_TYPE(THPVariable_Check(item), "parameter ", i, " has a .grad that is not a tensor");
      unpacked[i] = THPVariable_Unpack(item);
    }
    const gradfuse::GradientReport report = gradfuse::inspect_gradients(params_, unpacked);
    return py::make_tuple(report.bad_index, report.reason, py::bytes(report.codes));
  }

 private:
  std::vector<at::Tensor> params_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gradfuse native ops (registered under torch.ops.gradfuse)";
  m.def("inspect_parameters", &inspect_parameters, "First unusable parameter as (index, reason)");
  py::class_<GradientInspector>(m, "GradientInspector")
      .def(py::init<std::vector<at::Tensor>>(), py::arg("params"))
      .def("inspect", &GradientInspector::inspect, py::arg("grads"),
           "(index of the first unusable gradient or -1, reason, bytes of one GradientCode per parameter)");
  gradfuse::bind_launch_plan(m);
#ifdef GRADFUSE_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
}
