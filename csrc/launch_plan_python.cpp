// Python view of the CUDA launcher's work split (csrc/cuda/launch_plan.h), so the tests check
// on any machine that every element is swept exactly once, in balanced, aligned shares, that
// norm chunks do not depend on the grid, and where a segment's vector packs start.
#include "cuda/launch_plan.h"
#include "launch_plan_python.h"

namespace gradfuse {
namespace {

// The launches a list of tensor sizes takes with `depth` pointer lists and chunks of
// `chunk_units` units: per launch its tensors (list indices), chunk count and grid, and per block
// the (list index, first element, count) segments it sweeps in one go ("segments") and the same
// share chunk by chunk as (chunk, segments) pairs ("chunks"), as the kernels walk them.
py::list launch_plan(const std::vector<int64_t>& numels, int depth, int64_t resident_blocks, int64_t chunk_units) {
  TORCH_CHECK_VALUE(depth >= 1 && depth <= 4, "launch_plan: depth must be 1..4, got ", depth);
  TORCH_CHECK_VALUE(resident_blocks >= 1, "launch_plan: resident_blocks must be positive");
  TORCH_CHECK_VALUE(chunk_units >= 1, "launch_plan: chunk_units must be positive");
  py::list launches;
  for (const cuda::LaunchGroup& group :
       cuda::plan_launches(numels, cuda::table_capacity(depth), resident_blocks, chunk_units)) {
    const int num_tensors = static_cast<int>(group.tensors.size());
    std::vector<int64_t> numel(group.tensors.size());
    std::vector<int32_t> unit_begin(group.tensors.size() + 1);
    cuda::fill_table_sizes(group, numels, numel.data(), unit_begin.data());
    py::list blocks;
    for (int64_t block = 0; block < group.grid; ++block) {
      py::list segments;
      py::list chunks;
      py::list current;
      const auto record = [&](py::list& into) {
        return [&group, target = &into](int t, int64_t begin, int64_t count) {
          target->append(py::make_tuple(group.tensors[t], begin, count));
        };
      };
      cuda::for_each_block_segment(unit_begin.data(), numel.data(), num_tensors, chunk_units, block, group.grid,
                                   record(segments));
      cuda::for_each_chunk(unit_begin.data(), numel.data(), num_tensors, chunk_units, block, group.grid,
                           record(current), [&](int64_t chunk) {
                             chunks.append(py::make_tuple(chunk, current));
                             current = py::list();
                           });
      py::dict entry;
      entry["segments"] = segments;
      entry["chunks"] = chunks;
      blocks.append(entry);
    }
    py::dict launch;
    launch["tensors"] = group.tensors;
    launch["table_capacity"] = cuda::uses_small_table(num_tensors, depth)
                                   ? cuda::table_capacity(depth, cuda::kSmallParamBytes)
                                   : cuda::table_capacity(depth);
    launch["chunks"] = group.chunks;
    launch["grid"] = group.grid;
    launch["blocks"] = blocks;
    launches.append(launch);
  }
  return launches;
}

// A segment's (prologue, packs, tail) for lists given as (element address, element bytes), with
// packs of `width` elements, as sweep_segment walks it.
py::tuple pack_split(int64_t n, const std::vector<std::pair<uint64_t, int64_t>>& lists, int64_t width) {
  TORCH_CHECK_VALUE(width >= 1 && (width & (width - 1)) == 0, "pack_split: width must be a power of two");
  cuda::PackAlignment alignment{0, 1};
  for (const auto& [address, element_bytes] : lists) {
    TORCH_CHECK_VALUE(element_bytes == 1 || element_bytes == 2 || element_bytes == 4 || element_bytes == 8,
                      "pack_split: element bytes must be 1, 2, 4 or 8");
    alignment = cuda::add_list_alignment(alignment, address, element_bytes, width);
  }
  const cuda::PackSplit split = cuda::split_for_packs(n, alignment, width);
  return py::make_tuple(split.prologue, split.packs, split.tail);
}

}  // namespace

void bind_launch_plan(py::module& m) {
  m.def("launch_plan", &launch_plan, py::arg("numels"), py::arg("depth"), py::arg("resident_blocks"),
        py::arg("chunk_units") = 1, "The CUDA launcher's split of a tensor list into launches, blocks and chunks");
  m.attr("launch_unit_elements") = cuda::kUnitElements;
  m.def("norm_chunk_units", &cuda::norm_chunk_units, py::arg("numels"),
        "Units per norm partial the CUDA ops use for a list of tensor sizes");
  m.attr("norm_chunks_wanted") = cuda::kNormChunksWanted;
  m.def("pack_split", &pack_split, py::arg("n"), py::arg("lists"), py::arg("width"),
        "A CUDA segment's scalar prologue, vector packs and scalar tail for its lists' (address, element bytes)");
}

}  // namespace gradfuse
