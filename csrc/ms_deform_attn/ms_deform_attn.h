// Multi-scale deformable attention: the checked entry points of the CPU and CUDA kernels.
//
// Layout (Deformable DETR): value (B, Nv, H, Dh) with contiguous channels; spatial_shapes (L, 2) int64 as
// (height, width); level_start_index (L,) int64; sampling_locations (B, Nq, H, L, P, 2) normalized (x, y);
// attention_weights (B, Nq, H, L, P). The forward returns (B, Nq, H * Dh). Sampling is bilinear with zero
// padding and pixel = location * size - 0.5 (grid_sample with align_corners=False). im2col_step (> 0) is the
// number of images per CUDA launch (any value works, it need not divide the batch); the CPU kernels parallelise
// over the whole batch and only validate it.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>
#include <vector>

namespace salience_detr {

// Sizes shared by every kernel, read once from validated inputs.
struct MsDeformAttnSizes {
  int64_t batch;
  int64_t num_values;
  int64_t num_heads;
  int64_t head_dim;
  int64_t num_queries;
  int64_t num_levels;
  int64_t num_points;
};

// Validated, contiguous inputs. Every TORCH_CHECK names the argument at fault.
struct MsDeformAttnInputs {
  at::Tensor value;
  at::Tensor spatial_shapes;
  at::Tensor level_start_index;
  at::Tensor sampling_locations;
  at::Tensor attention_weights;
  MsDeformAttnSizes sizes;
};

MsDeformAttnInputs check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    int64_t im2col_step);

// Checks grad_output (B, Nq, H * Dh) against validated inputs; returns it contiguous.
at::Tensor check_grad_output(const at::Tensor& grad_output, const MsDeformAttnInputs& inputs);

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    int64_t im2col_step);

// Returns (grad_value, grad_sampling_locations, grad_attention_weights).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    int64_t im2col_step);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    int64_t im2col_step);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    int64_t im2col_step);

// Build facts of the CUDA half, compiled by nvcc: toolkit version and the architectures it generated code for.
std::string cuda_compiler_version();
std::string cuda_compiled_archs();
#endif

}  // namespace salience_detr
