// CPU kernels. Forward: one task per (batch, query, head) writing its own output slice. Backward: one task per
// (batch, head), which owns the disjoint slice grad_value[b, :, h, :] and the location/weight gradients of its
// queries, so no two threads ever write the same element (no atomics, no races). Channels are contiguous, so
// the inner loops over head_dim vectorise. Accumulation is in float (double for double inputs).
#include "../bilinear.h"
#include "../ms_deform_attn.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace salience_detr {
namespace {

// Level geometry read once from the int64 tensors.
struct LevelLayout {
  std::vector<int64_t> height, width, start;

  LevelLayout(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index) {
    const auto shapes = spatial_shapes.accessor<int64_t, 2>();
    const auto starts = level_start_index.accessor<int64_t, 1>();
    for (int64_t level = 0; level < spatial_shapes.size(0); ++level) {
      height.push_back(shapes[level][0]);
      width.push_back(shapes[level][1]);
      start.push_back(starts[level]);
    }
  }
};

template <typename scalar_t>
void forward_kernel(const MsDeformAttnInputs& in, const LevelLayout& levels, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsDeformAttnSizes s = in.sizes;
  const scalar_t* value = in.value.const_data_ptr<scalar_t>();
  const scalar_t* locations = in.sampling_locations.const_data_ptr<scalar_t>();
  const scalar_t* weights = in.attention_weights.const_data_ptr<scalar_t>();
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  const int64_t pixel_stride = s.num_heads * s.head_dim;
  const int64_t points_per_head = s.num_levels * s.num_points;

  at::parallel_for(0, s.batch * s.num_queries * s.num_heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> accumulator(s.head_dim);
    for (int64_t task = begin; task < end; ++task) {  // task = (b * Nq + q) * H + h
      const int64_t head = task % s.num_heads;
      const int64_t b = task / (s.num_queries * s.num_heads);
      std::fill(accumulator.begin(), accumulator.end(), acc_t(0));
      const scalar_t* task_locations = locations + task * points_per_head * 2;
      const scalar_t* task_weights = weights + task * points_per_head;
      for (int64_t level = 0; level < s.num_levels; ++level) {
        const scalar_t* level_value = value + ((b * s.num_values + levels.start[level]) * s.num_heads + head) * s.head_dim;
        for (int64_t point = 0; point < s.num_points; ++point) {
          const int64_t sample = level * s.num_points + point;
          const acc_t attention = static_cast<acc_t>(task_weights[sample]);
          const BilinearCorners<acc_t> corners = bilinear_corners<acc_t>(
              task_locations[2 * sample], task_locations[2 * sample + 1], levels.height[level], levels.width[level]);
          for (int corner = 0; corner < 4; ++corner) {
            if (corners.index[corner] < 0) {
              continue;
            }
            const acc_t scale = attention * corners.weight[corner];
            const scalar_t* row = level_value + corners.index[corner] * pixel_stride;
            for (int64_t c = 0; c < s.head_dim; ++c) {
              accumulator[c] += scale * static_cast<acc_t>(row[c]);
            }
          }
        }
      }
      scalar_t* task_out = out + task * s.head_dim;
      for (int64_t c = 0; c < s.head_dim; ++c) {
        task_out[c] = static_cast<scalar_t>(accumulator[c]);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(
    const MsDeformAttnInputs& in,
    const LevelLayout& levels,
    const at::Tensor& grad_output,
    at::Tensor& grad_value_acc,
    at::Tensor& grad_locations,
    at::Tensor& grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsDeformAttnSizes s = in.sizes;
  const scalar_t* value = in.value.const_data_ptr<scalar_t>();
  const scalar_t* locations = in.sampling_locations.const_data_ptr<scalar_t>();
  const scalar_t* weights = in.attention_weights.const_data_ptr<scalar_t>();
  const scalar_t* grad_out = grad_output.const_data_ptr<scalar_t>();
  acc_t* grad_value = grad_value_acc.mutable_data_ptr<acc_t>();
  scalar_t* grad_loc = grad_locations.mutable_data_ptr<scalar_t>();
  scalar_t* grad_attn = grad_weights.mutable_data_ptr<scalar_t>();
  const int64_t pixel_stride = s.num_heads * s.head_dim;
  const int64_t points_per_head = s.num_levels * s.num_points;

  at::parallel_for(0, s.batch * s.num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad(s.head_dim);
    for (int64_t slice = begin; slice < end; ++slice) {  // slice = b * H + h
      const int64_t b = slice / s.num_heads;
      const int64_t head = slice % s.num_heads;
      for (int64_t query = 0; query < s.num_queries; ++query) {
        const int64_t task = (b * s.num_queries + query) * s.num_heads + head;
        const scalar_t* task_grad_out = grad_out + task * s.head_dim;
        for (int64_t c = 0; c < s.head_dim; ++c) {
          grad[c] = static_cast<acc_t>(task_grad_out[c]);
        }
        for (int64_t level = 0; level < s.num_levels; ++level) {
          const int64_t level_offset = ((b * s.num_values + levels.start[level]) * s.num_heads + head) * s.head_dim;
          for (int64_t point = 0; point < s.num_points; ++point) {
            const int64_t sample = task * points_per_head + level * s.num_points + point;
            const acc_t attention = static_cast<acc_t>(weights[sample]);
            const BilinearCorners<acc_t> corners = bilinear_corners<acc_t>(
                locations[2 * sample], locations[2 * sample + 1], levels.height[level], levels.width[level]);
            acc_t grad_attention = 0, grad_x = 0, grad_y = 0;
            for (int corner = 0; corner < 4; ++corner) {
              if (corners.index[corner] < 0) {
                continue;
              }
              const int64_t row_offset = level_offset + corners.index[corner] * pixel_stride;
              const scalar_t* row = value + row_offset;
              acc_t* grad_row = grad_value + row_offset;
              const acc_t scale = attention * corners.weight[corner];
              acc_t dot = 0;
              for (int64_t c = 0; c < s.head_dim; ++c) {
                dot += grad[c] * static_cast<acc_t>(row[c]);
                grad_row[c] += scale * grad[c];
              }
              grad_attention += corners.weight[corner] * dot;
              grad_x += corners.weight_dx[corner] * dot;
              grad_y += corners.weight_dy[corner] * dot;
            }
            grad_attn[sample] = static_cast<scalar_t>(grad_attention);
            grad_loc[2 * sample] = static_cast<scalar_t>(attention * grad_x * static_cast<acc_t>(levels.width[level]));
            grad_loc[2 * sample + 1] =
                static_cast<scalar_t>(attention * grad_y * static_cast<acc_t>(levels.height[level]));
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    int64_t im2col_step) {
  const MsDeformAttnInputs in = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step);
  const MsDeformAttnSizes& s = in.sizes;
  const LevelLayout levels(in.spatial_shapes, in.level_start_index);
  at::Tensor output = at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, in.value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(in, levels, output);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const at::Tensor& grad_output,
    int64_t im2col_step) {
  const MsDeformAttnInputs in = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step);
  const at::Tensor grad_out = check_grad_output(grad_output, in);
  const LevelLayout levels(in.spatial_shapes, in.level_start_index);
  const at::ScalarType acc_type = at::toOpMathType(in.value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(in.value.sizes(), in.value.options().dtype(acc_type));
  at::Tensor grad_locations = at::empty_like(in.sampling_locations);
  at::Tensor grad_weights = at::empty_like(in.attention_weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(in, levels, grad_out, grad_value_acc, grad_locations, grad_weights);
  });
  return {grad_value_acc.to(in.value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace salience_detr
