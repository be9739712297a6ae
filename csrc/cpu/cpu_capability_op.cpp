// torch.ops.gradfuse._cpu_capability: reports (and, for tests and benchmarks, switches) which
// instruction-set build of the CPU kernels runs.
#include "cpu_capability.h"

#include <torch/library.h>

#include <optional>
#include <string>

namespace {

std::string cpu_capability(std::optional<std::string> use) {
  if (use.has_value()) {
    gradfuse::cpu::set_cpu_capability(*use);
  }
  return gradfuse::cpu::active_cpu_capability();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gradfuse, m) {
  // The active CPU kernel build ("default", "avx2", "avx512"); `use` switches to another first
  // and raises when this CPU or build lacks it.
  m.def("_cpu_capability(str? use=None) -> str", &cpu_capability);
}
