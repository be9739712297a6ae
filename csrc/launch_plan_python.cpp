// Python view of the CUDA launcher's work split (csrc/cuda/launch_plan.h), so the tests check
// on any machine that every element is swept exactly once, in balanced, aligned shares.
#include "cuda/launch_plan.h"
#include "launch_plan_python.h"

namespace gradfuse {
namespace {

// The launches a list of tensor sizes takes with `depth` pointer lists: per launch its tensors
// (list indices), grid, and per block the (list index, first element, count) segments it sweeps.
py::list launch_plan(const std::vector<int64_t>& numels, int depth, int64_t resident_blocks) {
  TORCH_CHECK_VALUE(depth >= 1 && depth <= 4, "launch_plan: depth must be 1..4, got ", depth);
  TORCH_CHECK_VALUE(resident_blocks >= 1, "launch_plan: resident_blocks must be positive");
  py::list launches;
  for (const cuda::LaunchGroup& group : cuda::plan_launches(numels, cuda::table_capacity(depth), resident_blocks)) {
    std::vector<int64_t> numel(group.tensors.size());
    std::vector<int32_t> unit_begin(group.tensors.size() + 1);
    cuda::fill_table_sizes(group, numels, numel.data(), unit_begin.data());
    py::list blocks;
    for (int64_t block = 0; block < group.grid; ++block) {
      py::list segments;
      cuda::for_each_segment(unit_begin.data(), numel.data(), static_cast<int>(group.tensors.size()), block,
                             group.grid, [&](int t, int64_t begin, int64_t count) {
                               segments.append(py::make_tuple(group.tensors[t], begin, count));
                             });
      blocks.append(segments);
    }
    py::dict launch;
    launch["tensors"] = group.tensors;
    launch["grid"] = group.grid;
    launch["blocks"] = blocks;
    launches.append(launch);
  }
  return launches;
}

}  // namespace

void bind_launch_plan(py::module& m) {
  m.def("launch_plan", &launch_plan, py::arg("numels"), py::arg("depth"), py::arg("resident_blocks"),
        "The CUDA launcher's split of a tensor list into launches and per-block segments");
  m.attr("launch_unit_elements") = cuda::kUnitElements;
}

}  // namespace gradfuse
