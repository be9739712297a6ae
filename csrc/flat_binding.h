// Registers FlatBinding (flat_buffers=True's per-step binding checks) on the gradfuse._C module.
#pragma once

#include <torch/extension.h>

namespace gradfuse {

void bind_flat_binding(py::module& m);

}  // namespace gradfuse
