// flat_buffers=True: every parameter and its .grad are views of one flat buffer per bucket. This
// native class binds the gradients and checks, once per step and without Python work per tensor,
// that the user's tensors still live there and which gradients autograd has added to.
#include "flat_binding.h"

#include <torch/csrc/autograd/python_variable.h>

#include <string>
#include <utility>
#include <vector>

namespace gradfuse {
namespace {

class FlatBinding {
 public:
  FlatBinding(std::vector<at::Tensor> params, std::vector<at::Tensor> param_views, std::vector<at::Tensor> grad_views)
      : params_(std::move(params)), param_views_(std::move(param_views)), grad_views_(std::move(grad_views)),
        start_versions_(params_.size(), 0) {
    TORCH_CHECK_VALUE(param_views_.size() == params_.size() && grad_views_.size() == params_.size(),
                      "FlatBinding: ", params_.size(), " parameters, ", param_views_.size(), " parameter views and ",
                      grad_views_.size(), " gradient views");
  }

  // p.grad = its view of the flat gradient buffer, for every parameter.
  void bind_grads() const {
    for (size_t i = 0; i < params_.size(); ++i) {
      params_[i].unsafeGetTensorImpl()->mutable_grad() = grad_views_[i];
    }
  }

  // (index, reason) of the first parameter that left its flat storage, or (-1, "").
  std::pair<int64_t, std::string> check() const {
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& p = params_[i];
      const at::Tensor& view = param_views_[i];
      const char* reason = nullptr;
      if (p.data_ptr() != view.data_ptr() || p.sizes() != view.sizes() || p.strides() != view.strides() ||
          p.scalar_type() != view.scalar_type()) {
        reason = "no longer lives in the optimizer's flat parameter buffer (was p.data rebound, or the module "
                 "moved with .to() / .cuda() / .half()?)";
      } else if (!p.requires_grad()) {
        reason = "no longer requires grad; flat_buffers=True updates every parameter it holds each cycle";
      } else if (p.unsafeGetTensorImpl()->grad().unsafeGetTensorImpl() != grad_views_[i].unsafeGetTensorImpl()) {
        reason = p.unsafeGetTensorImpl()->grad().defined()
                     ? "has a .grad that is not its view of the flat gradient buffer (replaced by someone else)"
                     : "has no .grad: it was set to None (module.zero_grad() or zero_grad(set_to_none=True) of "
                       "another object?), which drops the gradients summed so far";
      }
      if (reason != nullptr) {
        return {static_cast<int64_t>(i), reason};
      }
    }
    return {-1, std::string()};
  }

  // Remembers every gradient view's version: a view whose version has not moved by the end of the
  // cycle received no gradient in it (autograd's in-place add bumps it).
  void mark_cycle_start() {
    for (size_t i = 0; i < grad_views_.size(); ++i) {
      start_versions_[i] = grad_views_[i].unsafeGetTensorImpl()->version_counter().current_version();
    }
  }

  // Index of the first parameter whose gradient view was not written since mark_cycle_start(), or -1.
  int64_t first_untouched() const {
    for (size_t i = 0; i < grad_views_.size(); ++i) {
      if (grad_views_[i].unsafeGetTensorImpl()->version_counter().current_version() == start_versions_[i]) {
        return static_cast<int64_t>(i);
      }
    }
    return -1;
  }

 private:
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> param_views_;
  std::vector<at::Tensor> grad_views_;
  std::vector<uint32_t> start_versions_;
};

}  // namespace

void bind_flat_binding(py::module& m) {
  py::class_<FlatBinding>(m, "FlatBinding")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>(), py::arg("params"),
           py::arg("param_views"), py::arg("grad_views"))
      .def("bind_grads", &FlatBinding::bind_grads, "Sets every parameter's .grad to its gradient view")
      .def("check", &FlatBinding::check,
           "(index, reason) of the first parameter no longer bound to its flat storage, or (-1, '')")
      .def("mark_cycle_start", &FlatBinding::mark_cycle_start, "Records every gradient view's version")
      .def("first_untouched", &FlatBinding::first_untouched,
           "Index of the first gradient view not written since mark_cycle_start(), or -1");
}

}  // namespace gradfuse
