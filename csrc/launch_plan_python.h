// Registers the launch-plan view on the gradfuse._C module.
#pragma once

#include <torch/extension.h>

namespace gradfuse {

void bind_launch_plan(py::module& m);

}  // namespace gradfuse
