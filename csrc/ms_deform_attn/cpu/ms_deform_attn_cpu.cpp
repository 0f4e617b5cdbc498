// CPU kernels, organised for cache locality: a task handles one (batch, head) and walks the levels in the
// outer loop, so its working set is one level of one head's values (under 2 MB at 800x1088 input) rather than
// the whole value tensor. Forward tasks additionally split the queries into blocks (disjoint output slices).
// Backward tasks own the disjoint slice grad_value[b, :, h, :] and the location/weight gradients of their
// samples, so no two threads write the same element (no atomics, no races). Channels are contiguous and the
// channel loops vectorise. Accumulation is in float (double for double inputs).
#include "../bilinear.h"
#include "../ms_deform_attn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

namespace salience_detr {
namespace {

// Level geometry read once from the int64 tensors (host memory here, so testing that each level lies within
// value costs no copy; a level that does not is an error rather than a read outside value).
struct LevelLayout {
  std::vector<int64_t> height, width, start;

  LevelLayout(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t num_values) {
    const auto shapes = spatial_shapes.accessor<int64_t, 2>();
    const auto starts = level_start_index.accessor<int64_t, 1>();
    for (int64_t level = 0; level < spatial_shapes.size(0); ++level) {
      TORCH_CHECK(
          level_fits(shapes[level][0], shapes[level][1], starts[level], num_values), "spatial_shapes[", level, "] = (",
          shapes[level][0], ", ", shapes[level][1], ") starting at level_start_index[", level, "] = ", starts[level],
          " does not lie within the ", num_values, " values of value (its dim 1); ",
          "salience_detr.layers.ms_deform_attn.check_level_layout names the fault in the layout");
      height.push_back(shapes[level][0]);
      width.push_back(shapes[level][1]);
      start.push_back(starts[level]);
    }
  }
};

constexpr int64_t kQueryBlock = 256;
constexpr int64_t kLanes = 8;

// The per-task bodies are compiled twice on x86-64 with GCC (AVX2+FMA and baseline), picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SALIENCE_DETR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SALIENCE_DETR_CPU_CLONES
#endif

// accumulator += scale * row
template <typename acc_t, typename scalar_t>
inline void scaled_add(acc_t* __restrict__ accumulator, const scalar_t* __restrict__ row, acc_t scale, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    accumulator[c] += scale * static_cast<acc_t>(row[c]);
  }
}

// grad_row += scale * grad, returning dot(grad, row); partial sums in kLanes lanes so the loop vectorises
// without reassociating a single sum.
template <typename acc_t, typename scalar_t>
inline acc_t dot_and_scaled_add(
    const acc_t* __restrict__ grad,
    const scalar_t* __restrict__ row,
    acc_t* __restrict__ grad_row,
    acc_t scale,
    int64_t n) {
  acc_t partial[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      partial[lane] += grad[c + lane] * static_cast<acc_t>(row[c + lane]);
      grad_row[c + lane] += scale * grad[c + lane];
    }
  }
  for (; c < n; ++c) {
    partial[0] += grad[c] * static_cast<acc_t>(row[c]);
    grad_row[c] += scale * grad[c];
  }
  acc_t total = 0;
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    total += partial[lane];
  }
  return total;
}

// Raw pointers and sizes of one call, shared read-only by all tasks.
template <typename scalar_t>
struct KernelArgs {
  using acc_t = at::opmath_type<scalar_t>;
  MsDeformAttnSizes s;
  const LevelLayout* levels;
  const scalar_t* value;
  const scalar_t* locations;
  const scalar_t* weights;
  const scalar_t* grad_out;
  scalar_t* out;
  acc_t* grad_value;
  scalar_t* grad_loc;
  scalar_t* grad_attn;

  const scalar_t* level_value(int64_t b, int64_t head, int64_t level) const {
    return value + ((b * s.num_values + levels->start[level]) * s.num_heads + head) * s.head_dim;
  }
  int64_t first_sample(int64_t b, int64_t query, int64_t head, int64_t level) const {
    return (((b * s.num_queries + query) * s.num_heads + head) * s.num_levels + level) * s.num_points;
  }
  BilinearCorners<acc_t> corners(int64_t sample, int64_t level) const {
    return bilinear_corners<acc_t>(
        locations[2 * sample], locations[2 * sample + 1], levels->height[level], levels->width[level]);
  }
};

// Output rows [first_query, last_query) of head `head` in image `b`, accumulated level by level.
template <typename scalar_t>
SALIENCE_DETR_CPU_CLONES void forward_query_block(
    const KernelArgs<scalar_t>& args,
    int64_t b,
    int64_t head,
    int64_t first_query,
    int64_t last_query,
    at::opmath_type<scalar_t>* accumulator) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsDeformAttnSizes& s = args.s;
  const int64_t pixel_stride = s.num_heads * s.head_dim;
  std::fill(accumulator, accumulator + (last_query - first_query) * s.head_dim, acc_t(0));
  for (int64_t level = 0; level < s.num_levels; ++level) {
    const scalar_t* level_value = args.level_value(b, head, level);
    for (int64_t query = first_query; query < last_query; ++query) {
      acc_t* query_accumulator = accumulator + (query - first_query) * s.head_dim;
      const int64_t first_sample = args.first_sample(b, query, head, level);
      for (int64_t sample = first_sample; sample < first_sample + s.num_points; ++sample) {
        const acc_t attention = static_cast<acc_t>(args.weights[sample]);
        const BilinearCorners<acc_t> corners = args.corners(sample, level);
        for (int corner = 0; corner < 4; ++corner) {
          if (corners.index[corner] >= 0) {
            scaled_add(
                query_accumulator, level_value + corners.index[corner] * pixel_stride,
                attention * corners.weight[corner], s.head_dim);
          }
        }
        const acc_t outside = outside_contribution(corners, attention);
        if (outside != acc_t(0)) {  // NaN (rare): the query's output is NaN, as in the reference
          std::fill(query_accumulator, query_accumulator + s.head_dim, outside);
        }
      }
    }
  }
  for (int64_t query = first_query; query < last_query; ++query) {
    scalar_t* query_out = args.out + ((b * s.num_queries + query) * s.num_heads + head) * s.head_dim;
    const acc_t* query_accumulator = accumulator + (query - first_query) * s.head_dim;
    for (int64_t c = 0; c < s.head_dim; ++c) {
      query_out[c] = static_cast<scalar_t>(query_accumulator[c]);
    }
  }
}

// All gradients of head `head` in image `b`: grad_value[b, :, head, :] and its samples' location/weight grads.
template <typename scalar_t>
SALIENCE_DETR_CPU_CLONES void backward_head_slice(
    const KernelArgs<scalar_t>& args, int64_t b, int64_t head, at::opmath_type<scalar_t>* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsDeformAttnSizes& s = args.s;
  const int64_t pixel_stride = s.num_heads * s.head_dim;
  for (int64_t level = 0; level < s.num_levels; ++level) {
    const int64_t level_offset = args.level_value(b, head, level) - args.value;
    const scalar_t* level_value = args.value + level_offset;
    acc_t* level_grad_value = args.grad_value + level_offset;
    const acc_t width = static_cast<acc_t>(args.levels->width[level]);
    const acc_t height = static_cast<acc_t>(args.levels->height[level]);
    for (int64_t query = 0; query < s.num_queries; ++query) {
      const scalar_t* query_grad_out = args.grad_out + ((b * s.num_queries + query) * s.num_heads + head) * s.head_dim;
      for (int64_t c = 0; c < s.head_dim; ++c) {
        grad[c] = static_cast<acc_t>(query_grad_out[c]);
      }
      const int64_t first_sample = args.first_sample(b, query, head, level);
      for (int64_t sample = first_sample; sample < first_sample + s.num_points; ++sample) {
        const acc_t attention = static_cast<acc_t>(args.weights[sample]);
        const BilinearCorners<acc_t> corners = args.corners(sample, level);
        acc_t grad_attention = 0, grad_x = 0, grad_y = 0;
        for (int corner = 0; corner < 4; ++corner) {
          acc_t dot = 0;  // an outside corner's value is zero, but its weights still multiply it (bilinear.h)
          if (corners.index[corner] >= 0) {
            const int64_t row = corners.index[corner] * pixel_stride;
            dot = dot_and_scaled_add(
                grad, level_value + row, level_grad_value + row, attention * corners.weight[corner], s.head_dim);
          }
          grad_attention += corners.weight[corner] * dot;
          grad_x += corners.weight_dx[corner] * dot;
          grad_y += corners.weight_dy[corner] * dot;
        }
        args.grad_attn[sample] = static_cast<scalar_t>(grad_attention);
        args.grad_loc[2 * sample] = static_cast<scalar_t>(attention * grad_x * width);
        args.grad_loc[2 * sample + 1] = static_cast<scalar_t>(attention * grad_y * height);
      }
    }
  }
}

template <typename scalar_t>
KernelArgs<scalar_t> kernel_args(const MsDeformAttnInputs& in, const LevelLayout& levels) {
  KernelArgs<scalar_t> args{};
  args.s = in.sizes;
  args.levels = &levels;
  args.value = in.value.const_data_ptr<scalar_t>();
  args.locations = in.sampling_locations.const_data_ptr<scalar_t>();
  args.weights = in.attention_weights.const_data_ptr<scalar_t>();
  return args;
}

template <typename scalar_t>
void forward_kernel(const MsDeformAttnInputs& in, const LevelLayout& levels, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  KernelArgs<scalar_t> args = kernel_args<scalar_t>(in, levels);
  args.out = output.mutable_data_ptr<scalar_t>();
  const MsDeformAttnSizes s = in.sizes;
  const int64_t query_blocks = (s.num_queries + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, s.batch * s.num_heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> accumulator(kQueryBlock * s.head_dim);
    for (int64_t task = begin; task < end; ++task) {  // task = (b * H + h) * query_blocks + block
      const int64_t first_query = task % query_blocks * kQueryBlock;
      forward_query_block(
          args, task / (s.num_heads * query_blocks), task / query_blocks % s.num_heads, first_query,
          std::min(first_query + kQueryBlock, s.num_queries), accumulator.data());
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
  KernelArgs<scalar_t> args = kernel_args<scalar_t>(in, levels);
  args.grad_out = grad_output.const_data_ptr<scalar_t>();
  args.grad_value = grad_value_acc.mutable_data_ptr<acc_t>();
  args.grad_loc = grad_locations.mutable_data_ptr<scalar_t>();
  args.grad_attn = grad_weights.mutable_data_ptr<scalar_t>();
  const MsDeformAttnSizes s = in.sizes;
  at::parallel_for(0, s.batch * s.num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad(s.head_dim);
    for (int64_t slice = begin; slice < end; ++slice) {  // slice = b * H + h
      backward_head_slice(args, slice / s.num_heads, slice % s.num_heads, grad.data());
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
  const LevelLayout levels(in.spatial_shapes, in.level_start_index, in.sizes.num_values);
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
  const LevelLayout levels(in.spatial_shapes, in.level_start_index, in.sizes.num_values);
  const at::ScalarType acc_type = at::toOpMathType(in.value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(in.value.sizes(), in.value.options().dtype(acc_type));
  at::Tensor grad_locations = at::empty(in.sampling_locations.sizes(), in.sampling_locations.options());
  at::Tensor grad_weights = at::empty(in.attention_weights.sizes(), in.attention_weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(in, levels, grad_out, grad_value_acc, grad_locations, grad_weights);
  });
  return {grad_value_acc.to(in.value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace salience_detr
