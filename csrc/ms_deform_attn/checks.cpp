// Argument checks shared by the CPU and CUDA entry points: a wrong call fails here with a message naming the
// argument, never inside a kernel. Only shapes, dtypes and devices are checked here, so no call copies data to the
// host; the values of spatial_shapes and level_start_index are checked in Python (check_level_layout), once per
// transformer forward, and the kernels only make sure that no level reads outside value (bilinear.h).
#include "ms_deform_attn.h"

#include <ATen/core/Tensor.h>
#include <c10/util/safe_numerics.h>

#include <initializer_list>

namespace salience_detr {
namespace {

void check_same_device(const at::Tensor& tensor, const at::Tensor& value, const char* name) {
  TORCH_CHECK(
      tensor.device() == value.device(), name, " is on ", tensor.device(), " but value is on ", value.device(),
      "; move all inputs to one device");
}

void check_float_like_value(const at::Tensor& tensor, const at::Tensor& value, const char* name) {
  TORCH_CHECK(
      tensor.scalar_type() == value.scalar_type(), name, " has dtype ", tensor.scalar_type(), " but value has ",
      value.scalar_type(), "; cast them to one floating dtype");
}

// Sizes whose product does not fit in int64 would wrap around in the kernels' index arithmetic.
void check_product_fits(std::initializer_list<int64_t> factors, const char* what) {
  int64_t product = 1;
  for (const int64_t factor : factors) {
    TORCH_CHECK(
        !c10::mul_overflows(product, factor, &product), what, " overflows int64 (sizes ", c10::IntArrayRef(factors),
        "); split the batch or the queries into smaller calls");
  }
}

}  // namespace

MsDeformAttnInputs check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    int64_t im2col_step) {
  TORCH_CHECK(im2col_step > 0, "im2col_step must be positive, got ", im2col_step);
  TORCH_CHECK(value.dim() == 4, "value must be 4-D (batch, num_values, num_heads, head_dim), got ", value.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(value.scalar_type()), "value must be floating point, got ", value.scalar_type());
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
      "spatial_shapes must be (num_levels, 2) as (height, width), got ", spatial_shapes.sizes());
  TORCH_CHECK(
      spatial_shapes.scalar_type() == at::kLong, "spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  const int64_t num_levels = spatial_shapes.size(0);
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.size(0) == num_levels,
      "level_start_index must be (num_levels,) = (", num_levels, ",), got ", level_start_index.sizes());
  TORCH_CHECK(
      level_start_index.scalar_type() == at::kLong, "level_start_index must be int64, got ",
      level_start_index.scalar_type());

  const MsDeformAttnSizes sizes{
      value.size(0),
      value.size(1),
      value.size(2),
      value.size(3),
      sampling_locations.dim() == 6 ? sampling_locations.size(1) : 0,
      num_levels,
      sampling_locations.dim() == 6 ? sampling_locations.size(4) : 0};
  TORCH_CHECK(
      sampling_locations.dim() == 6 && sampling_locations.size(0) == sizes.batch &&
          sampling_locations.size(2) == sizes.num_heads && sampling_locations.size(3) == num_levels &&
          sampling_locations.size(5) == 2,
      "sampling_locations must be (batch=", sizes.batch, ", num_queries, num_heads=", sizes.num_heads,
      ", num_levels=", num_levels, ", num_points, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(
      attention_weights.dim() == 5 && attention_weights.size(0) == sizes.batch &&
          attention_weights.size(1) == sizes.num_queries && attention_weights.size(2) == sizes.num_heads &&
          attention_weights.size(3) == num_levels && attention_weights.size(4) == sizes.num_points,
      "attention_weights must be (batch, num_queries, num_heads, num_levels, num_points) = (", sizes.batch, ", ",
      sizes.num_queries, ", ", sizes.num_heads, ", ", num_levels, ", ", sizes.num_points, "), got ",
      attention_weights.sizes());
  check_float_like_value(sampling_locations, value, "sampling_locations");
  check_float_like_value(attention_weights, value, "attention_weights");
  check_same_device(spatial_shapes, value, "spatial_shapes");
  check_same_device(level_start_index, value, "level_start_index");
  check_same_device(sampling_locations, value, "sampling_locations");
  check_same_device(attention_weights, value, "attention_weights");
  check_product_fits(
      {sizes.batch, sizes.num_queries, sizes.num_heads, sizes.head_dim},
      "the output size batch * num_queries * num_heads * head_dim");

  return MsDeformAttnInputs{
      value.contiguous(),
      spatial_shapes.contiguous(),
      level_start_index.contiguous(),
      sampling_locations.contiguous(),
      attention_weights.contiguous(),
      sizes};
}

at::Tensor check_grad_output(const at::Tensor& grad_output, const MsDeformAttnInputs& inputs) {
  const MsDeformAttnSizes& s = inputs.sizes;
  TORCH_CHECK(
      grad_output.dim() == 3 && grad_output.size(0) == s.batch && grad_output.size(1) == s.num_queries &&
          grad_output.size(2) == s.num_heads * s.head_dim,
      "grad_output must be (batch, num_queries, num_heads * head_dim) = (", s.batch, ", ", s.num_queries, ", ",
      s.num_heads * s.head_dim, "), got ", grad_output.sizes());
  check_float_like_value(grad_output, inputs.value, "grad_output");
  check_same_device(grad_output, inputs.value, "grad_output");
  return grad_output.contiguous();
}

}  // namespace salience_detr
