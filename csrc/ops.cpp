// The salience_detr operator library: schemas, CPU/CUDA registrations, and the Python module
// `salience_detr._C` (importing it registers the ops) with the facts of this build for collect_env.
#include "grid_nms/grid_nms.h"
#include "ms_deform_attn/ms_deform_attn.h"

// torch/library.h and pybind11 only: torch/extension.h would pull in the whole C++ frontend and double the
// compile time of this file.
#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

namespace salience_detr {
namespace {

std::string host_compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return "MSVC " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["compiler"] = host_compiler();
  info["torch_version"] = std::string(TORCH_VERSION);
  // at::parallel_for is inline: under torch's OpenMP backend the kernels run on one thread unless the extension
  // is compiled with OpenMP too (setup.py adds -fopenmp).
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = cuda_compiler_version();
  info["cuda_archs"] = cuda_compiled_archs();
#else
  info["with_cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = pybind11::none();
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(salience_detr, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
      "Tensor attention_weights, int im2col_step) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output, int im2col_step) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "grid_nms(Tensor token_index, Tensor spatial_shapes, Tensor level_start_index, SymInt num_tokens) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(salience_detr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
  m.impl("grid_nms", &grid_nms_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(salience_detr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
  m.impl("grid_nms", &grid_nms_cuda);
}
#endif

}  // namespace salience_detr

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "salience_detr compiled operators (registered as torch.ops.salience_detr.*)";
  m.def("build_info", &salience_detr::build_info, "Compiler, torch and CUDA versions, CUDA archs of this build");
}
