// Grid NMS: greedy non-maximum suppression of candidate tokens on their levels' integer grids.
//
// Each candidate is a token of the flattened multi-scale sequence (levels row-major, finest first, as for the
// deformable-attention op) and stands for the box (x - 1, y - 1, x + 1, y + 1) in its level's cells. At an IoU
// threshold in [1/7, 1/3) NMS suppresses a token exactly when a kept token of the same level and image lies in the
// same cell or at Manhattan distance 1 (side neighbours: IoU 1/3; diagonal ones: 1/7; farther ones: 0), so the
// kernels keep a bitmap of kept cells instead of computing IoUs. Candidates are visited in the given order, which
// is the descending score order. The result is a (B, k) bool keep mask of fixed size: nothing is read back to
// the host.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace salience_detr {

// Validated, contiguous inputs of grid_nms; every TORCH_CHECK names the argument at fault.
struct GridNmsInputs {
  at::Tensor token_index;        // (B, k) int64
  at::Tensor spatial_shapes;     // (L, 2) int64 as (height, width)
  at::Tensor level_start_index;  // (L,) int64
  int64_t num_tokens;            // tokens of one image over all levels: the size of its bitmap
};

GridNmsInputs check_grid_nms_inputs(
    const at::Tensor& token_index,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    int64_t num_tokens);

// 32-bit words of one image's bitmap of kept cells.
C10_HOST_DEVICE inline int64_t grid_nms_bitmap_words(int64_t num_tokens) { return (num_tokens + 31) / 32; }

at::Tensor grid_nms_cpu(
    const at::Tensor& token_index,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    int64_t num_tokens);

#ifdef WITH_CUDA
at::Tensor grid_nms_cuda(
    const at::Tensor& token_index,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    int64_t num_tokens);
#endif

// Whether cell `token` is marked kept; tokens outside [0, num_tokens) never are.
C10_HOST_DEVICE inline bool grid_nms_is_kept(const uint32_t* kept_cells, int64_t token, int64_t num_tokens) {
  return token >= 0 && token < num_tokens && ((kept_cells[token >> 5] >> (token & 31)) & 1u) != 0;
}

// The level holding `token`: the last one starting at or before it (-1 before the first), as searchsorted(right).
C10_HOST_DEVICE inline int64_t grid_nms_level(const int64_t* starts, int64_t num_levels, int64_t token) {
  int64_t level = -1;
  for (int64_t candidate = 0; candidate < num_levels; ++candidate) {
    if (starts[candidate] <= token) {
      level = candidate;
    }
  }
  return level;
}

// One image, shared by the CPU and CUDA kernels: visits the k candidates in order and keeps each one that no kept
// candidate covers (same cell or a side neighbour on its level). `kept_cells` holds grid_nms_bitmap_words zeros.
// A token outside the image's tokens or outside its level's grid (a layout that does not tile num_tokens) is not
// kept, and nothing is read or written outside the bitmap.
C10_HOST_DEVICE inline void grid_nms_image(
    const int64_t* tokens,
    int64_t num_candidates,
    const int64_t* shapes,
    const int64_t* starts,
    int64_t num_levels,
    int64_t num_tokens,
    uint32_t* kept_cells,
    bool* keep) {
  for (int64_t i = 0; i < num_candidates; ++i) {
    const int64_t token = tokens[i];
    const int64_t level = grid_nms_level(starts, num_levels, token);
    keep[i] = false;
    if (token < 0 || token >= num_tokens || level < 0) {
      continue;
    }
    const int64_t height = shapes[2 * level];
    const int64_t width = shapes[2 * level + 1];
    const int64_t cell = token - starts[level];
    if (width <= 0 || height <= 0 || cell >= height * width) {
      continue;
    }
    const int64_t x = cell % width;
    const int64_t y = cell / width;
    const bool covered = grid_nms_is_kept(kept_cells, token, num_tokens) ||
                         (x > 0 && grid_nms_is_kept(kept_cells, token - 1, num_tokens)) ||
                         (x + 1 < width && grid_nms_is_kept(kept_cells, token + 1, num_tokens)) ||
                         (y > 0 && grid_nms_is_kept(kept_cells, token - width, num_tokens)) ||
                         (y + 1 < height && grid_nms_is_kept(kept_cells, token + width, num_tokens));
    if (!covered) {
      keep[i] = true;
      kept_cells[token >> 5] |= 1u << (token & 31);
    }
  }
}

}  // namespace salience_detr
