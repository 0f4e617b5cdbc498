// CUDA kernels. Forward: one thread per (batch, query, head, channel), neighbouring threads reading neighbouring
// channels. Backward: one thread per sample (batch, query, head, level, point) looping over channels; it owns
// its location/weight gradients and adds into grad_value with atomics, in a float buffer (double for double)
// that is cast to the value dtype at the end. A level that does not lie within value (a layout that
// check_level_layout in Python rejects) gives NaN rather than a read outside it: a kernel cannot raise without
// a host sync. Only ATen/c10 headers here, to keep nvcc time down.
#include "../bilinear.h"
#include "../ms_deform_attn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <string>

namespace salience_detr {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;

// Device pointers of one call; sizes are the validated ones.
template <typename scalar_t>
struct DeviceArgs {
  MsDeformAttnSizes s;
  const int64_t* spatial_shapes;
  const int64_t* level_start_index;
  const scalar_t* value;
  const scalar_t* locations;
  const scalar_t* weights;
};

template <typename scalar_t>
DeviceArgs<scalar_t> device_args(const MsDeformAttnInputs& in) {
  return DeviceArgs<scalar_t>{
      in.sizes,
      in.spatial_shapes.const_data_ptr<int64_t>(),
      in.level_start_index.const_data_ptr<int64_t>(),
      in.value.const_data_ptr<scalar_t>(),
      in.sampling_locations.const_data_ptr<scalar_t>(),
      in.attention_weights.const_data_ptr<scalar_t>()};
}

// Threads cover the batches [first_batch, first_batch + chunk) of one launch; index is (b, q, h, c).
template <typename scalar_t>
__global__ void forward_kernel(DeviceArgs<scalar_t> args, scalar_t* out, int64_t first_batch, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsDeformAttnSizes& s = args.s;
  const int64_t pixel_stride = s.num_heads * s.head_dim;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = index % s.head_dim;
    const int64_t task = first_batch * s.num_queries * s.num_heads + index / s.head_dim;  // (b * Nq + q) * H + h
    const int64_t head = task % s.num_heads;
    const int64_t b = task / (s.num_queries * s.num_heads);
    acc_t accumulator = 0;
    for (int64_t level = 0; level < s.num_levels; ++level) {
      const int64_t height = args.spatial_shapes[2 * level];
      const int64_t width = args.spatial_shapes[2 * level + 1];
      const int64_t start = args.level_start_index[level];
      if (!level_fits(height, width, start, s.num_values)) {  // never read outside value: the output is NaN
        accumulator = std::numeric_limits<acc_t>::quiet_NaN();
        continue;
      }
      const scalar_t* level_value = args.value + ((b * s.num_values + start) * s.num_heads + head) * s.head_dim + c;
      const int64_t first_sample = (task * s.num_levels + level) * s.num_points;
      for (int64_t sample = first_sample; sample < first_sample + s.num_points; ++sample) {
        const acc_t attention = static_cast<acc_t>(args.weights[sample]);
        const BilinearCorners<acc_t> corners = bilinear_corners<acc_t>(
            static_cast<acc_t>(args.locations[2 * sample]), static_cast<acc_t>(args.locations[2 * sample + 1]), height,
            width);
        for (int corner = 0; corner < 4; ++corner) {
          if (corners.index[corner] >= 0) {
            accumulator += attention * corners.weight[corner] *
                           static_cast<acc_t>(level_value[corners.index[corner] * pixel_stride]);
          }
        }
        accumulator += outside_contribution(corners, attention);  // 0, or NaN as in the reference
      }
    }
    out[task * s.head_dim + c] = static_cast<scalar_t>(accumulator);
  }
}

// Threads cover the samples of batches [first_batch, first_batch + chunk); index is (b, q, h, l, p).
template <typename scalar_t>
__global__ void backward_kernel(
    DeviceArgs<scalar_t> args,
    const scalar_t* grad_out,
    at::opmath_type<scalar_t>* grad_value,
    scalar_t* grad_loc,
    scalar_t* grad_attn,
    int64_t first_batch,
    int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsDeformAttnSizes& s = args.s;
  const int64_t pixel_stride = s.num_heads * s.head_dim;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t sample = first_batch * s.num_queries * s.num_heads * s.num_levels * s.num_points + index;
    const int64_t level = sample / s.num_points % s.num_levels;
    const int64_t task = sample / (s.num_points * s.num_levels);  // (b * Nq + q) * H + h
    const int64_t head = task % s.num_heads;
    const int64_t b = task / (s.num_queries * s.num_heads);
    const int64_t height = args.spatial_shapes[2 * level];
    const int64_t width = args.spatial_shapes[2 * level + 1];
    const int64_t start = args.level_start_index[level];
    if (!level_fits(height, width, start, s.num_values)) {  // never touch value: its location/weight grads are NaN
      grad_attn[sample] = grad_loc[2 * sample] = grad_loc[2 * sample + 1] =
          static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
      continue;
    }
    const int64_t level_offset = ((b * s.num_values + start) * s.num_heads + head) * s.head_dim;
    const scalar_t* task_grad_out = grad_out + task * s.head_dim;
    const acc_t attention = static_cast<acc_t>(args.weights[sample]);
    const BilinearCorners<acc_t> corners = bilinear_corners<acc_t>(
        static_cast<acc_t>(args.locations[2 * sample]), static_cast<acc_t>(args.locations[2 * sample + 1]), height,
        width);
    acc_t grad_attention = 0, grad_x = 0, grad_y = 0;
    for (int corner = 0; corner < 4; ++corner) {
      acc_t dot = 0;  // an outside corner's value is zero, but its weights still multiply it (bilinear.h)
      if (corners.index[corner] >= 0) {
        const int64_t row = level_offset + corners.index[corner] * pixel_stride;
        const acc_t scale = attention * corners.weight[corner];
        for (int64_t c = 0; c < s.head_dim; ++c) {
          const acc_t grad = static_cast<acc_t>(task_grad_out[c]);
          dot += grad * static_cast<acc_t>(args.value[row + c]);
          atomicAdd(grad_value + row + c, scale * grad);
        }
      }
      grad_attention += corners.weight[corner] * dot;
      grad_x += corners.weight_dx[corner] * dot;
      grad_y += corners.weight_dy[corner] * dot;
    }
    grad_attn[sample] = static_cast<scalar_t>(grad_attention);
    grad_loc[2 * sample] = static_cast<scalar_t>(attention * grad_x * static_cast<acc_t>(width));
    grad_loc[2 * sample + 1] = static_cast<scalar_t>(attention * grad_y * static_cast<acc_t>(height));
  }
}

unsigned int blocks_for(int64_t total) {
  return static_cast<unsigned int>(std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
}

#define SALIENCE_DETR_STRINGIFY_(x) #x
#define SALIENCE_DETR_STRINGIFY(x) SALIENCE_DETR_STRINGIFY_(x)

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    int64_t im2col_step) {
  const MsDeformAttnInputs in = check_ms_deform_attn_inputs(
      value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step);
  const c10::cuda::CUDAGuard device_guard(in.value.device());
  const MsDeformAttnSizes& s = in.sizes;
  at::Tensor output = at::empty({s.batch, s.num_queries, s.num_heads * s.head_dim}, in.value.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const DeviceArgs<scalar_t> args = device_args<scalar_t>(in);
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    for (int64_t first_batch = 0; first_batch < s.batch; first_batch += im2col_step) {
      const int64_t chunk = std::min(im2col_step, s.batch - first_batch);
      const int64_t total = chunk * s.num_queries * s.num_heads * s.head_dim;
      if (total == 0) {
        continue;
      }
      forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(args, out, first_batch, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
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
  const c10::cuda::CUDAGuard device_guard(in.value.device());
  const MsDeformAttnSizes& s = in.sizes;
  const at::ScalarType acc_type = at::toOpMathType(in.value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(in.value.sizes(), in.value.options().dtype(acc_type));
  at::Tensor grad_locations = at::empty(in.sampling_locations.sizes(), in.sampling_locations.options());
  at::Tensor grad_weights = at::empty(in.attention_weights.sizes(), in.attention_weights.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const DeviceArgs<scalar_t> args = device_args<scalar_t>(in);
        for (int64_t first_batch = 0; first_batch < s.batch; first_batch += im2col_step) {
          const int64_t chunk = std::min(im2col_step, s.batch - first_batch);
          const int64_t total = chunk * s.num_queries * s.num_heads * s.num_levels * s.num_points;
          if (total == 0) {
            continue;
          }
          backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
              args, grad_out.const_data_ptr<scalar_t>(), grad_value_acc.mutable_data_ptr<acc_t>(),
              grad_locations.mutable_data_ptr<scalar_t>(), grad_weights.mutable_data_ptr<scalar_t>(), first_batch,
              total);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {grad_value_acc.to(in.value.scalar_type()), grad_locations, grad_weights};
}

std::string cuda_compiler_version() {
  return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__);
}

std::string cuda_compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return SALIENCE_DETR_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown (nvcc did not define __CUDA_ARCH_LIST__)";
#endif
}

}  // namespace salience_detr
