// Grid NMS: argument checks (shared with the CUDA entry point) and the CPU kernel, images in parallel.
#include "grid_nms.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

namespace salience_detr {
namespace {

void check_int64(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(
      tensor.scalar_type() == at::kLong, name, " must be int64, got ", tensor.scalar_type(),
      "; build it with dtype=torch.long");
}

void check_same_device(const at::Tensor& tensor, const at::Tensor& token_index, const char* name) {
  TORCH_CHECK(
      tensor.device() == token_index.device(), name, " is on ", tensor.device(), " but token_index is on ",
      token_index.device(), "; move all inputs to one device");
}

}  // namespace

GridNmsInputs check_grid_nms_inputs(
    const at::Tensor& token_index,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    int64_t num_tokens) {
  TORCH_CHECK(token_index.dim() == 2, "token_index must be 2-D (batch, num_candidates), got ", token_index.dim(), "-D");
  TORCH_CHECK(
      spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 && spatial_shapes.size(0) > 0,
      "spatial_shapes must be (num_levels, 2) with at least one level, got ", spatial_shapes.sizes());
  TORCH_CHECK(
      level_start_index.dim() == 1 && level_start_index.size(0) == spatial_shapes.size(0),
      "level_start_index must be (num_levels,) = (", spatial_shapes.size(0), ",), got ", level_start_index.sizes());
  TORCH_CHECK(num_tokens >= 0, "num_tokens must be the number of tokens of one image (>= 0), got ", num_tokens);
  check_int64(token_index, "token_index");
  check_int64(spatial_shapes, "spatial_shapes");
  check_int64(level_start_index, "level_start_index");
  check_same_device(spatial_shapes, token_index, "spatial_shapes");
  check_same_device(level_start_index, token_index, "level_start_index");
  return GridNmsInputs{
      token_index.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(), num_tokens};
}

at::Tensor grid_nms_cpu(
    const at::Tensor& token_index,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    int64_t num_tokens) {
  const GridNmsInputs in = check_grid_nms_inputs(token_index, spatial_shapes, level_start_index, num_tokens);
  const int64_t batch = in.token_index.size(0);
  const int64_t num_candidates = in.token_index.size(1);
  const int64_t* tokens = in.token_index.const_data_ptr<int64_t>();
  const auto out_of_range = std::find_if(
      tokens, tokens + batch * num_candidates, [&](int64_t token) { return token < 0 || token >= num_tokens; });
  TORCH_CHECK(
      out_of_range == tokens + batch * num_candidates, "token_index holds ", *out_of_range,
      ", outside the image's tokens [0, ", num_tokens, "); pass flat token indices over all levels");
  at::Tensor keep = at::empty({batch, num_candidates}, in.token_index.options().dtype(at::kBool));
  const int64_t* shapes = in.spatial_shapes.const_data_ptr<int64_t>();
  const int64_t* starts = in.level_start_index.const_data_ptr<int64_t>();
  const int64_t num_levels = in.spatial_shapes.size(0);
  bool* keep_data = keep.mutable_data_ptr<bool>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> kept_cells(grid_nms_bitmap_words(num_tokens));
    for (int64_t image = begin; image < end; ++image) {
      std::fill(kept_cells.begin(), kept_cells.end(), 0u);
      grid_nms_image(
          tokens + image * num_candidates, num_candidates, shapes, starts, num_levels, num_tokens, kept_cells.data(),
          keep_data + image * num_candidates);
    }
  });
  return keep;
}

}  // namespace salience_detr
