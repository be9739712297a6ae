#include "state_gather.h"

#include <unordered_map>
#include <vector>

namespace gradfuse {
namespace {

// (one list per key: state[params[i]][key] or None, slots whose entry lacks a key). The state
// dict is walked once by PyDict_Next: a tensor key's hash is a Python-level call, a pointer
// match is not.
py::tuple gather_param_state(const py::dict& state, const py::list& params, const std::vector<std::string>& keys) {
  std::unordered_map<PyObject*, PyObject*> entry_of;
  entry_of.reserve(static_cast<size_t>(PyDict_Size(state.ptr())));
  Py_ssize_t position = 0;
  PyObject* key = nullptr;
  PyObject* value = nullptr;
  while (PyDict_Next(state.ptr(), &position, &key, &value)) {
    entry_of.emplace(key, value);
  }
  std::vector<py::object> names;
  for (const std::string& k : keys) {
    names.push_back(py::reinterpret_steal<py::object>(PyUnicode_InternFromString(k.c_str())));
  }
  const size_t n = params.size();
  // Filled with PyList_SET_ITEM, which assumes empty slots: lists made by PyList_New, not py::list(n).
  auto lists = py::reinterpret_steal<py::list>(PyList_New(static_cast<Py_ssize_t>(keys.size())));
  if (!lists) {
    throw py::error_already_set();
  }
  std::vector<PyObject*> raw(keys.size());
  for (size_t j = 0; j < keys.size(); ++j) {
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(n));
    if (list == nullptr) {
      throw py::error_already_set();
    }
    raw[j] = list;
    PyList_SET_ITEM(lists.ptr(), static_cast<Py_ssize_t>(j), list);  // steals the reference
  }
  py::list incomplete;
  for (size_t i = 0; i < n; ++i) {
    const auto found = entry_of.find(PyList_GET_ITEM(params.ptr(), static_cast<Py_ssize_t>(i)));
    PyObject* entry = found == entry_of.end() || !PyDict_Check(found->second) ? nullptr : found->second;
    bool complete = true;
    for (size_t j = 0; j < keys.size(); ++j) {
      PyObject* item = entry == nullptr ? nullptr : PyDict_GetItemWithError(entry, names[j].ptr());
      if (item == nullptr && PyErr_Occurred()) {
        throw py::error_already_set();
      }
      if (item == nullptr || item == Py_None) {
        complete = false;
        item = Py_None;
      }
      Py_INCREF(item);
      PyList_SET_ITEM(raw[j], static_cast<Py_ssize_t>(i), item);
    }
    if (!complete) {
      incomplete.append(static_cast<int64_t>(i));
    }
  }
  return py::make_tuple(lists, incomplete);
}

// Whether a and b hold the same objects in the same order (identity, not equality).
bool same_objects(const py::list& a, const py::list& b) {
  const Py_ssize_t n = PyList_GET_SIZE(a.ptr());
  if (n != PyList_GET_SIZE(b.ptr())) {
    return false;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (PyList_GET_ITEM(a.ptr(), i) != PyList_GET_ITEM(b.ptr(), i)) {
      return false;
    }
  }
  return true;
}

}  // namespace

void bind_state_gather(py::module& m) {
  m.def("gather_param_state", &gather_param_state, py::arg("state"), py::arg("params"), py::arg("keys"),
        "([state[params[i]][key] or None for each i] for each key, [slots missing a key])");
  m.def("same_objects", &same_objects, py::arg("a"), py::arg("b"),
        "Whether two lists hold the same objects in the same order");
}

}  // namespace gradfuse
