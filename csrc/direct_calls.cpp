// The optimizer's per-step op calls straight into the CPU/CUDA implementations, skipping the
// dispatcher's per-tensor boxing of every list argument (about 0.1 us per tensor and list, the
// bulk of a step over thousands of small tensors). Same kernels and same input checks as the
// registered ops; a call returns false, untouched, when a tensor needs Python dispatch (a tensor
// subclass with __torch_dispatch__), and the caller then goes through torch.ops.
#include "direct_calls.h"
#include "ops.h"

#include <ATen/record_function.h>

namespace gradfuse {
namespace {

// The tensors of a Python list, borrowed: no reference counting per tensor (each count change
// on a tensor Python owns also touches its Python object). The caller's list keeps them alive
// for the call; the optimizer passes fresh lists of tensors it also holds itself.
class BorrowedTensors {
 public:
  using Traits = c10::MaybeOwnedTraits<at::Tensor>;

  BorrowedTensors(const py::handle& list, const char* name) {
    TORCH_CHECK_TYPE(PyList_Check(list.ptr()), name, " must be a list of tensors");
    const Py_ssize_t n = PyList_GET_SIZE(list.ptr());
    for (Py_ssize_t i = 0; i < n; ++i) {  // every check before the first borrow: nothing to undo
      TORCH_CHECK_TYPE(THPVariable_Check(PyList_GET_ITEM(list.ptr(), i)), name, "[", i, "] is not a tensor");
    }
    tensors_.reserve(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      tensors_.push_back(Traits::createBorrow(THPVariable_Unpack(PyList_GET_ITEM(list.ptr(), i))));
    }
  }
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) {
      Traits::destroyBorrow(t);
    }
  }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;

  const std::vector<at::Tensor>& tensors() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

std::optional<at::Tensor> unpack_optional(const py::handle& object, const char* name) {
  if (object.is_none()) {
    return std::nullopt;
  }
  TORCH_CHECK_TYPE(THPVariable_Check(object.ptr()), name, " must be a tensor or None");
  return THPVariable_Unpack(object.ptr());
}

bool needs_python_dispatch(const at::Tensor& t) {
  return t.defined() && t.key_set().has(c10::DispatchKey::Python);
}

bool any_needs_python_dispatch(std::initializer_list<const std::vector<at::Tensor>*> lists,
                               std::initializer_list<const std::optional<at::Tensor>*> singles) {
  for (const auto* list : lists) {
    for (const at::Tensor& t : *list) {
      if (needs_python_dispatch(t)) {
        return true;
      }
    }
  }
  for (const auto* single : singles) {
    if (single->has_value() && needs_python_dispatch(**single)) {
      return true;
    }
  }
  return false;
}

enum class Backend { kCpu, kCuda, kOther };

// The backend of a call: its first tensor's device (each backend checks that all tensors share
// it); kOther (meta, other accelerators) goes through the dispatcher.
Backend backend_of(const std::vector<at::Tensor>& list, const at::Tensor& fallback) {
  const at::Tensor& first = list.empty() ? fallback : list[0];
  if (first.is_cpu()) {
    return Backend::kCpu;
  }
  return first.is_cuda() ? Backend::kCuda : Backend::kOther;
}

#ifndef GRADFUSE_WITH_CUDA
[[noreturn]] void fail_without_cuda(const char* op) {
  TORCH_CHECK(false, op, ": the tensors are on CUDA but gradfuse was built without its CUDA kernels");
}
#endif

bool accumulate(const py::handle& accs_list, const py::handle& grads_list, double scale, bool first,
                const py::handle& norm_state_object, double norm_type, const py::handle& amp_scale_object,
                const py::handle& tensor_norms_object) {
  const BorrowedTensors borrowed_accs(accs_list, "accs");
  const BorrowedTensors borrowed_grads(grads_list, "grads");
  const std::vector<at::Tensor>& accs = borrowed_accs.tensors();
  const std::vector<at::Tensor>& grads = borrowed_grads.tensors();
  const std::optional<at::Tensor> norm_state = unpack_optional(norm_state_object, "norm_state");
  const std::optional<at::Tensor> amp_scale = unpack_optional(amp_scale_object, "amp_scale");
  const std::optional<at::Tensor> tensor_norms = unpack_optional(tensor_norms_object, "tensor_norms");
  if (accs.empty() && !norm_state.has_value()) {
    return true;  // nothing to add and no norm to feed: the op does nothing either
  }
  const Backend backend = backend_of(accs, accs.empty() ? *norm_state : accs[0]);
  if (backend == Backend::kOther ||
      any_needs_python_dispatch({&accs, &grads}, {&norm_state, &amp_scale, &tensor_norms})) {
    return false;
  }
  const py::gil_scoped_release no_gil;
  RECORD_FUNCTION("gradfuse::accumulate_", std::vector<c10::IValue>());
  if (backend == Backend::kCuda) {
#ifdef GRADFUSE_WITH_CUDA
    cuda::accumulate_(accs, grads, scale, first, norm_state, norm_type, amp_scale, tensor_norms);
#else
    fail_without_cuda("gradfuse::accumulate_");
#endif
  } else {
    cpu::accumulate_(accs, grads, scale, first, norm_state, norm_type, amp_scale, tensor_norms);
  }
  return true;
}

bool accumulate_norm(const py::handle& norm_state_object, const py::handle& tensors_list, double norm_type,
                     const py::handle& tensor_norms_object) {
  TORCH_CHECK_TYPE(THPVariable_Check(norm_state_object.ptr()), "norm_state must be a tensor");
  const std::optional<at::Tensor> norm_state = THPVariable_Unpack(norm_state_object.ptr());
  const BorrowedTensors borrowed_tensors(tensors_list, "tensors");
  const std::vector<at::Tensor>& tensors = borrowed_tensors.tensors();
  const std::optional<at::Tensor> tensor_norms = unpack_optional(tensor_norms_object, "tensor_norms");
  const Backend backend = backend_of({}, *norm_state);
  if (backend == Backend::kOther || any_needs_python_dispatch({&tensors}, {&norm_state, &tensor_norms})) {
    return false;
  }
  const py::gil_scoped_release no_gil;
  RECORD_FUNCTION("gradfuse::accumulate_norm_", std::vector<c10::IValue>());
  if (backend == Backend::kCuda) {
#ifdef GRADFUSE_WITH_CUDA
    cuda::accumulate_norm_(*norm_state, tensors, norm_type, tensor_norms);
#else
    fail_without_cuda("gradfuse::accumulate_norm_");
#endif
  } else {
    cpu::accumulate_norm_(*norm_state, tensors, norm_type, tensor_norms);
  }
  return true;
}

bool clipped_sgd_step(const py::handle& params_list, const py::handle& grads_list, const py::handle& buffers_list,
                      const py::handle& flags_list, const py::handle& total_norm_object,
                      const py::handle& lr_tensor_object, double lr, double weight_decay, double momentum,
                      double dampening, bool nesterov, bool maximize, double grad_scale, double max_norm,
                      bool skip_nonfinite) {
  const BorrowedTensors borrowed_params(params_list, "params");
  const BorrowedTensors borrowed_grads(grads_list, "grads");
  const BorrowedTensors borrowed_buffers(buffers_list, "momentum_buffers");
  const BorrowedTensors borrowed_flags(flags_list, "momentum_initialized");
  const std::vector<at::Tensor>& params = borrowed_params.tensors();
  const std::vector<at::Tensor>& grads = borrowed_grads.tensors();
  const std::vector<at::Tensor>& buffers = borrowed_buffers.tensors();
  const std::vector<at::Tensor>& flags = borrowed_flags.tensors();
  TORCH_CHECK_TYPE(THPVariable_Check(total_norm_object.ptr()), "total_norm must be a tensor");
  const std::optional<at::Tensor> total_norm = THPVariable_Unpack(total_norm_object.ptr());
  const std::optional<at::Tensor> lr_tensor = unpack_optional(lr_tensor_object, "lr_tensor");
  const Backend backend = backend_of(params, *total_norm);
  if (backend == Backend::kOther ||
      any_needs_python_dispatch({&params, &grads, &buffers, &flags}, {&total_norm, &lr_tensor})) {
    return false;
  }
  const py::gil_scoped_release no_gil;
  RECORD_FUNCTION("gradfuse::clipped_sgd_step_", std::vector<c10::IValue>());
  if (backend == Backend::kCuda) {
#ifdef GRADFUSE_WITH_CUDA
    cuda::clipped_sgd_step_(params, grads, buffers, flags, *total_norm, lr_tensor, lr, weight_decay, momentum,
                            dampening, nesterov, maximize, grad_scale, max_norm, skip_nonfinite);
#else
    fail_without_cuda("gradfuse::clipped_sgd_step_");
#endif
  } else {
    cpu::clipped_sgd_step_(params, grads, buffers, flags, *total_norm, lr_tensor, lr, weight_decay, momentum,
                           dampening, nesterov, maximize, grad_scale, max_norm, skip_nonfinite);
  }
  return true;
}

bool clipped_adamw_step(const py::handle& params_list, const py::handle& grads_list, const py::handle& exp_avgs_list,
                        const py::handle& exp_avg_sqs_list, const py::handle& max_exp_avg_sqs_list,
                        const py::handle& state_steps_list, const py::handle& total_norm_object,
                        const py::handle& lr_tensor_object, double lr, double beta1, double beta2, double eps,
                        double weight_decay, bool amsgrad, bool maximize, double grad_scale, double max_norm,
                        bool skip_nonfinite) {
  const BorrowedTensors borrowed_params(params_list, "params");
  const BorrowedTensors borrowed_grads(grads_list, "grads");
  const BorrowedTensors borrowed_exp_avgs(exp_avgs_list, "exp_avgs");
  const BorrowedTensors borrowed_exp_avg_sqs(exp_avg_sqs_list, "exp_avg_sqs");
  const BorrowedTensors borrowed_max_exp_avg_sqs(max_exp_avg_sqs_list, "max_exp_avg_sqs");
  const BorrowedTensors borrowed_steps(state_steps_list, "state_steps");
  const std::vector<at::Tensor>& params = borrowed_params.tensors();
  const std::vector<at::Tensor>& grads = borrowed_grads.tensors();
  const std::vector<at::Tensor>& exp_avgs = borrowed_exp_avgs.tensors();
  const std::vector<at::Tensor>& exp_avg_sqs = borrowed_exp_avg_sqs.tensors();
  const std::vector<at::Tensor>& max_exp_avg_sqs = borrowed_max_exp_avg_sqs.tensors();
  const std::vector<at::Tensor>& steps = borrowed_steps.tensors();
  TORCH_CHECK_TYPE(THPVariable_Check(total_norm_object.ptr()), "total_norm must be a tensor");
  const std::optional<at::Tensor> total_norm = THPVariable_Unpack(total_norm_object.ptr());
  const std::optional<at::Tensor> lr_tensor = unpack_optional(lr_tensor_object, "lr_tensor");
  const Backend backend = backend_of(params, *total_norm);
  if (backend == Backend::kOther ||
      any_needs_python_dispatch({&params, &grads, &exp_avgs, &exp_avg_sqs, &max_exp_avg_sqs, &steps},
                                {&total_norm, &lr_tensor})) {
    return false;
  }
  const py::gil_scoped_release no_gil;
  RECORD_FUNCTION("gradfuse::clipped_adamw_step_", std::vector<c10::IValue>());
  if (backend == Backend::kCuda) {
#ifdef GRADFUSE_WITH_CUDA
    cuda::clipped_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *total_norm, lr_tensor, lr,
                              beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, max_norm,
                              skip_nonfinite);
#else
    fail_without_cuda("gradfuse::clipped_adamw_step_");
#endif
  } else {
    cpu::clipped_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *total_norm, lr_tensor, lr,
                             beta1, beta2, eps, weight_decay, amsgrad, maximize, grad_scale, max_norm,
                             skip_nonfinite);
  }
  return true;
}

}  // namespace

void bind_direct_calls(py::module& m) {
  py::module direct = m.def_submodule("direct", "The optimizer's op calls without the dispatcher (see "
                                                "csrc/direct_calls.cpp); each returns False, having done "
                                                "nothing, when a tensor needs Python dispatch");
  direct.def("accumulate_", &accumulate, py::arg("accs"), py::arg("grads"), py::arg("scale"), py::arg("first"),
             py::arg("norm_state"), py::arg("norm_type"), py::arg("amp_scale"), py::arg("tensor_norms") = py::none());
  direct.def("accumulate_norm_", &accumulate_norm, py::arg("norm_state"), py::arg("tensors"),
             py::arg("norm_type"), py::arg("tensor_norms") = py::none());
  direct.def("clipped_sgd_step_", &clipped_sgd_step, py::arg("params"), py::arg("grads"),
             py::arg("momentum_buffers"), py::arg("momentum_initialized"), py::arg("total_norm"),
             py::arg("lr_tensor"), py::arg("lr"), py::arg("weight_decay"), py::arg("momentum"),
             py::arg("dampening"), py::arg("nesterov"), py::arg("maximize"), py::arg("grad_scale"),
             py::arg("max_norm"), py::arg("skip_nonfinite"));
  direct.def("clipped_adamw_step_", &clipped_adamw_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
             py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("state_steps"), py::arg("total_norm"),
             py::arg("lr_tensor"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
             py::arg("weight_decay"), py::arg("amsgrad"), py::arg("maximize"), py::arg("grad_scale"),
             py::arg("max_norm"), py::arg("skip_nonfinite"));
}

}  // namespace gradfuse
