// The gradfuse._C Python module: loading it registers the ops; it also exposes the
// native gradient inspection the optimizer runs before touching any state.
#include "direct_calls.h"
#include "flat_binding.h"
#include "launch_plan_python.h"
#include "state_gather.h"
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
      reason = "is complex; gradfuse supports real floating-point parameters only (view complex "
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

// Gathers and inspects the gradients of a fixed parameter list once per step, reading .grad
// natively (no Python attribute access per tensor: the per-step hot path for 1000s of tensors).
class GradientInspector {
 public:
  explicit GradientInspector(std::vector<at::Tensor> params) : params_(std::move(params)) {}

  // (index of the first unusable gradient or -1, reason, codes, the gradients as a list).
  py::tuple gather() const {
    std::vector<const at::Tensor*> grads(params_.size(), nullptr);  // owned by the parameters
    py::list out(params_.size());
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& grad = params_[i].unsafeGetTensorImpl()->grad();
      if (grad.defined()) {
        grads[i] = &grad;
        out[i] = py::reinterpret_steal<py::object>(THPVariable_Wrap(grad));  // the same object p.grad gives
      } else {
        out[i] = py::none();
      }
    }
    const gradfuse::GradientReport report = gradfuse::inspect_gradients(params_, grads);
    return py::make_tuple(report.bad_index, report.reason, py::bytes(report.codes), out);
  }

  // p.grad = grads[i] for every entry that is not None (the optimizer hands its accumulators back as
  // .grad; it guarantees matching dtype, shape and device), one native loop for 1000s of tensors.
  void set_grads(const py::list& grads) const {
    TORCH_CHECK_VALUE(grads.size() == params_.size(), "set_grads: ", grads.size(), " gradients for ",
                      params_.size(), " parameters");
    for (size_t i = 0; i < params_.size(); ++i) {
      PyObject* grad = PyList_GET_ITEM(grads.ptr(), static_cast<Py_ssize_t>(i));
      if (grad == Py_None) {
        continue;
      }
      TORCH_CHECK_TYPE(THPVariable_Check(grad), "set_grads: grads[", i, "] is not a tensor");
      params_[i].unsafeGetTensorImpl()->mutable_grad() = THPVariable_Unpack(grad);
    }
  }

  // p.grad = None for every parameter, without a Python attribute write per tensor.
  void clear_grads() const {
    for (const at::Tensor& p : params_) {
      c10::TensorImpl* impl = p.unsafeGetTensorImpl();
      if (impl->grad().defined()) {
        impl->mutable_grad().reset();
      }
    }
  }

 private:
  std::vector<at::Tensor> params_;
};

// Index of the first tensor whose version counter moved from versions[i] (None: not watched),
// or -1: one native pass instead of a Python attribute read per tensor.
int64_t first_modified(const py::list& tensors, const py::list& versions) {
  TORCH_CHECK_VALUE(tensors.size() == versions.size(), "first_modified: ", tensors.size(), " tensors for ",
                    versions.size(), " versions");
  for (size_t i = 0; i < versions.size(); ++i) {
    PyObject* version = PyList_GET_ITEM(versions.ptr(), static_cast<Py_ssize_t>(i));
    if (version == Py_None) {
      continue;
    }
    PyObject* tensor = PyList_GET_ITEM(tensors.ptr(), static_cast<Py_ssize_t>(i));
    TORCH_CHECK_TYPE(THPVariable_Check(tensor), "first_modified: tensors[", i, "] is not a tensor");
    const c10::TensorImpl* impl = THPVariable_Unpack(tensor).unsafeGetTensorImpl();
    if (static_cast<long long>(impl->version_counter().current_version()) != PyLong_AsLongLong(version)) {
      return static_cast<int64_t>(i);
    }
  }
  return -1;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gradfuse native ops (registered under torch.ops.gradfuse)";
  m.def("inspect_parameters", &inspect_parameters, "First unusable parameter as (index, reason)");
  m.def("first_modified", &first_modified, py::arg("tensors"), py::arg("versions"),
        "Index of the first tensor whose version counter differs from versions[i] (None: skipped), or -1");
  py::class_<GradientInspector>(m, "GradientInspector")
      .def(py::init<std::vector<at::Tensor>>(), py::arg("params"))
      .def("gather", &GradientInspector::gather,
           "(index of the first unusable gradient or -1, reason, bytes of one GradientCode per parameter, "
           "list of the gradients)")
      .def("clear_grads", &GradientInspector::clear_grads, "Sets every parameter's .grad to None")
      .def("set_grads", &GradientInspector::set_grads, py::arg("grads"),
           "Sets parameter i's .grad to grads[i] wherever grads[i] is not None");
  gradfuse::bind_launch_plan(m);
  gradfuse::bind_direct_calls(m);
  gradfuse::bind_flat_binding(m);
  gradfuse::bind_state_gather(m);
#ifdef GRADFUSE_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
}
