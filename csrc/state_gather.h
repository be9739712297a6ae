// Reads optimizer state the way torch.optim users write it (opt.state[p][key]), natively: the
// per-step source of truth for the update's state tensors, with no Python-level tensor hashing.
#pragma once

#include <torch/extension.h>

namespace gradfuse {

void bind_state_gather(py::module& m);

}  // namespace gradfuse
