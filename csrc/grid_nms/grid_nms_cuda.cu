// Grid NMS on CUDA: one thread per image walks its candidates in order (the suppression is sequential by nature)
// over a bitmap of kept cells in global memory, zeroed by the allocation. A token outside the image's tokens is
// not kept: a kernel cannot raise without a host sync (the CPU kernel refuses such input).
#include "grid_nms.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace salience_detr {
namespace {

constexpr int kImagesPerBlock = 32;

__global__ void grid_nms_kernel(
    const int64_t* tokens,
    const int64_t* shapes,
    const int64_t* starts,
    int64_t batch,
    int64_t num_candidates,
    int64_t num_levels,
    int64_t num_tokens,
    uint32_t* kept_cells,
    bool* keep) {
  const int64_t image = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (image >= batch) {
    return;
  }
  grid_nms_image(
      tokens + image * num_candidates, num_candidates, shapes, starts, num_levels, num_tokens,
      kept_cells + image * grid_nms_bitmap_words(num_tokens), keep + image * num_candidates);
}

}  // namespace

at::Tensor grid_nms_cuda(
    const at::Tensor& token_index,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    int64_t num_tokens) {
  const GridNmsInputs in = check_grid_nms_inputs(token_index, spatial_shapes, level_start_index, num_tokens);
  const c10::cuda::CUDAGuard device_guard(in.token_index.device());
  const int64_t batch = in.token_index.size(0);
  const int64_t num_candidates = in.token_index.size(1);
  at::Tensor keep = at::empty({batch, num_candidates}, in.token_index.options().dtype(at::kBool));
  if (batch == 0 || num_candidates == 0) {
    return keep;
  }
  at::Tensor kept_cells =
      at::zeros({batch, grid_nms_bitmap_words(num_tokens)}, in.token_index.options().dtype(at::kInt));
  const int64_t blocks = (batch + kImagesPerBlock - 1) / kImagesPerBlock;
  grid_nms_kernel<<<blocks, kImagesPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      in.token_index.const_data_ptr<int64_t>(), in.spatial_shapes.const_data_ptr<int64_t>(),
      in.level_start_index.const_data_ptr<int64_t>(), batch, num_candidates, in.spatial_shapes.size(0), num_tokens,
      reinterpret_cast<uint32_t*>(kept_cells.mutable_data_ptr<int32_t>()), keep.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return keep;
}

}  // namespace salience_detr
