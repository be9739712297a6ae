// Registers gradfuse._C.direct: the optimizer's per-step op calls without the dispatcher.
#pragma once

#include <torch/extension.h>

namespace gradfuse {

void bind_direct_calls(py::module& m);

}  // namespace gradfuse
