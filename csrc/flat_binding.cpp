// flat_buffers=True: every parameter and its .grad are views of one flat buffer per bucket. This
// native class binds the gradients and checks them at every micro-step, in one pass without
// Python work per tensor: the parameters still live in the buffer, each gradient view was changed
// at most by autograd's one in-place add per backward, and every parameter got a gradient in the
// cycle. A .grad set to None (module.zero_grad()) with no backward since is bound again.
#include "flat_binding.h"

#include <string>
#include <utility>
#include <vector>

namespace gradfuse {
namespace {

class FlatBinding {
 public:
  FlatBinding(std::vector<at::Tensor> params, std::vector<at::Tensor> param_views, std::vector<at::Tensor> grad_views)
      : params_(std::move(params)), param_views_(std::move(param_views)), grad_views_(std::move(grad_views)),
        last_versions_(params_.size(), 0), touched_(params_.size(), 0) {
    TORCH_CHECK_VALUE(param_views_.size() == params_.size() && grad_views_.size() == params_.size(),
                      "FlatBinding: ", params_.size(), " parameters, ", param_views_.size(), " parameter views and ",
                      grad_views_.size(), " gradient views");
  }

  // p.grad = its view of the flat gradient buffer, for every parameter; new_cycle: the buffer was
  // just zeroed, so no parameter has had a gradient yet (the views' versions did not move).
  void bind_grads(bool new_cycle) {
    for (size_t i = 0; i < params_.size(); ++i) {
      prefetch_metadata(i + kAhead);
      at::Tensor& grad = params_[i].unsafeGetTensorImpl()->mutable_grad();
      if (grad.unsafeGetTensorImpl() != grad_views_[i].unsafeGetTensorImpl()) {  // a read is cheaper than a write
        grad = grad_views_[i];
      }
    }
    if (new_cycle) {
      std::fill(touched_.begin(), touched_.end(), 0);
    }
  }

  // A cycle starts (or resumes): the current versions are the baseline, and only the parameters
  // in `with_gradient` (restored from a checkpoint) have had a gradient in it.
  void mark_cycle_start(const std::vector<int64_t>& with_gradient) {
    for (size_t i = 0; i < grad_views_.size(); ++i) {
      last_versions_[i] = version_of(grad_views_[i]);
    }
    std::fill(touched_.begin(), touched_.end(), 0);
    for (int64_t i : with_gradient) {
      TORCH_CHECK_INDEX(i >= 0 && static_cast<size_t>(i) < touched_.size(), "mark_cycle_start: slot ", i);
      touched_[i] = 1;
    }
  }

  // One micro-step's check, (index, reason) of the first problem or (-1, ""). Nothing changes
  // unless all is well; then a .grad set to None (the view keeps the sum) is bound again.
  // max_bumps: the version moves one backward may make (autograd's add, plus DDP's copy of the
  // reduced sum). end_of_cycle: every parameter must have had a gradient; the next cycle starts.
  std::pair<int64_t, std::string> check_micro_step(int64_t max_bumps, bool end_of_cycle) {
    const size_t n = params_.size();
    unbound_.resize(n);
    versions_.resize(n);
    for (size_t i = 0; i < n; ++i) {
      prefetch_metadata(i + kAhead);
      const char* reason = check_one(i, max_bumps, end_of_cycle);
      if (reason != nullptr) {
        return {static_cast<int64_t>(i), reason};
      }
    }
    for (size_t i = 0; i < n; ++i) {  // all is well: rebind, and record this micro-step
      if (unbound_[i]) {
        params_[i].unsafeGetTensorImpl()->mutable_grad() = grad_views_[i];
      }
      touched_[i] |= versions_[i] != last_versions_[i];
      last_versions_[i] = versions_[i];
    }
    if (end_of_cycle) {
      std::fill(touched_.begin(), touched_.end(), 0);  // zeroing the buffer leaves the views' versions
    }
    return {-1, std::string()};
  }

 private:
  static constexpr size_t kAhead = 8;  // parameters ahead whose metadata is fetched (cold after a backward)

  // Starts loading what the checks of parameter i read: two levels, since the autograd metadata and
  // the storage are found through the tensor, which was requested kAhead parameters earlier.
  void prefetch_metadata(size_t i) const {
    if (i + kAhead < params_.size()) {
      __builtin_prefetch(params_[i + kAhead].unsafeGetTensorImpl());
      __builtin_prefetch(param_views_[i + kAhead].unsafeGetTensorImpl());
      __builtin_prefetch(grad_views_[i + kAhead].unsafeGetTensorImpl());
    }
    if (i < params_.size()) {
      __builtin_prefetch(params_[i].unsafeGetTensorImpl()->autograd_meta());
    }
  }

  static uint32_t version_of(const at::Tensor& t) {
    return t.unsafeGetTensorImpl()->version_counter().current_version();
  }

  // Why parameter i cannot go on (nullptr when it can); fills unbound_[i] and versions_[i].
  const char* check_one(size_t i, int64_t max_bumps, bool end_of_cycle) {
    const at::Tensor& p = params_[i];
    const c10::TensorImpl* impl = p.unsafeGetTensorImpl();
    const c10::TensorImpl* view = param_views_[i].unsafeGetTensorImpl();
    // The storage objects and offsets, not data_ptr(): that would also read each storage's own line.
    if (impl->unsafe_storage().unsafeGetStorageImpl() != view->unsafe_storage().unsafeGetStorageImpl() ||
        impl->storage_offset() != view->storage_offset() || impl->sizes() != view->sizes() ||
        impl->strides() != view->strides() || impl->dtype() != view->dtype()) {
      return "no longer lives in the optimizer's flat parameter buffer (was p.data rebound, or the module moved "
             "with .to() / .cuda() / .half()?)";
    }
    if (!p.requires_grad()) {
      return "no longer requires grad; flat_buffers=True updates every parameter it holds each cycle";
    }
    const at::Tensor& grad = p.unsafeGetTensorImpl()->grad();
    const at::Tensor& grad_view = grad_views_[i];
    versions_[i] = version_of(grad_view);
    unbound_[i] = !grad.defined();
    if (grad.defined() && grad.unsafeGetTensorImpl() != grad_view.unsafeGetTensorImpl()) {
      // Autograd made a new .grad (it was None during backward), DDP bound its bucket view, or
      // backward(create_graph=True) summed out of place: which of the micro-batches it holds is unknown.
      return "has a .grad that is not its view of the flat gradient buffer (set to None by module.zero_grad() "
             "before a backward without optimizer.zero_grad() after it, assigned, DDP's "
             "gradient_as_bucket_view=True, or backward(create_graph=True)?)";
    }
    const int64_t bumps = static_cast<int64_t>(versions_[i] - last_versions_[i]);
    if (bumps > max_bumps) {
      return "had its .grad (the cycle's running sum) changed more than once since the last step(): two "
             "backward passes before one step() (retain_graph=True, a module run twice under reentrant "
             "checkpointing), which flat_buffers=True cannot tell from an in-place change, or an in-place change "
             "(module.zero_grad(set_to_none=False), a framework's gradient clipping or unscaling). Call step() "
             "after each backward, or use flat_buffers=False; clip with max_grad_norm= and zero with "
             "optimizer.zero_grad()";
    }
    if (end_of_cycle && touched_[i] == 0 && bumps == 0) {
      return "received no gradient in this accumulation cycle; flat_buffers=True updates every parameter every "
             "cycle, where torch.optim skips one without gradient";
    }
    return nullptr;
  }

  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> param_views_;
  std::vector<at::Tensor> grad_views_;
  std::vector<uint32_t> last_versions_;  // each view's version at the last check
  std::vector<uint8_t> touched_;         // got a gradient since the cycle started
  std::vector<uint8_t> unbound_;         // scratch of one check: .grad is None
  std::vector<uint32_t> versions_;       // scratch of one check
};

}  // namespace

void bind_flat_binding(py::module& m) {
  py::class_<FlatBinding>(m, "FlatBinding")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>(), py::arg("params"),
           py::arg("param_views"), py::arg("grad_views"))
      .def("bind_grads", &FlatBinding::bind_grads, py::arg("new_cycle"),
           "Sets every parameter's .grad to its gradient view; new_cycle: no parameter has had a gradient yet")
      .def("mark_cycle_start", &FlatBinding::mark_cycle_start, py::arg("with_gradient"),
           "Records every gradient view's version as a cycle's start; the slots in with_gradient have had one")
      .def("check_micro_step", &FlatBinding::check_micro_step, py::arg("max_bumps"), py::arg("end_of_cycle"),
           "(index, reason) of the first parameter that cannot go on, or (-1, '') after rebinding gradients set "
           "to None or replaced and recording the micro-step");
}

}  // namespace gradfuse
