// Sampling geometry shared by the CPU and CUDA kernels, so both follow one convention:
// pixel = location * size - 0.5 (align_corners=False), and corners outside the map contribute a zero value.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace salience_detr {

// The four neighbours of a sampling point: their pixel index within the level (-1 when outside the map),
// their interpolation weights, and the weights' derivatives with respect to the pixel coordinates.
// A corner outside the map contributes a zero value, but its weights still take part in the arithmetic, as in
// grid_sample: callers multiply them by zero (giving NaN when a weight or the attention is not finite), so
// NaN and inf in the inputs reach the output and the gradients where the PyTorch reference puts them.
template <typename acc_t>
struct BilinearCorners {
  int64_t index[4];
  acc_t weight[4];
  acc_t weight_dx[4];
  acc_t weight_dy[4];
};

// A sampling point in pixel coordinates: (x, y), and when some corner may lie on the map (`near_map`), its
// top-left neighbour (x0, y0) and the fractions (lx, ly) toward the next pixel. The CPU kernels use it directly
// to test the four corners with four comparisons; bilinear_corners expands it.
template <typename acc_t>
struct BilinearPoint {
  acc_t x, y;
  bool near_map;
  int64_t x0, y0;
  acc_t lx, ly;
};

template <typename acc_t>
C10_HOST_DEVICE inline BilinearPoint<acc_t> bilinear_point(
    acc_t location_x, acc_t location_y, int64_t height, int64_t width) {
  BilinearPoint<acc_t> point;
  point.x = location_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  point.y = location_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  // Written so that NaN, inf and points a full pixel or more outside the map are not near it (no corner inside).
  point.near_map = point.x > static_cast<acc_t>(-1) && point.y > static_cast<acc_t>(-1) &&
                   point.x < static_cast<acc_t>(width) && point.y < static_cast<acc_t>(height);
  if (!point.near_map) {
    point.x0 = point.y0 = -1;
    point.lx = point.ly = 0;
    return point;
  }
  const acc_t x_floor = ::floor(point.x);
  const acc_t y_floor = ::floor(point.y);
  point.x0 = static_cast<int64_t>(x_floor);
  point.y0 = static_cast<int64_t>(y_floor);
  point.lx = point.x - x_floor;
  point.ly = point.y - y_floor;
  return point;
}

template <typename acc_t>
C10_HOST_DEVICE inline BilinearCorners<acc_t> bilinear_corners(
    acc_t location_x, acc_t location_y, int64_t height, int64_t width) {
  BilinearCorners<acc_t> corners;
  const BilinearPoint<acc_t> point = bilinear_point(location_x, location_y, height, width);
  if (!point.near_map) {
    // c - c is 0 for a finite coordinate and NaN for NaN or inf: the value grid_sample's weights take then.
    // A non-finite x poisons every weight and the y derivatives (they hold x's fractions), and vice versa.
    const acc_t x_poison = point.x - point.x;
    const acc_t y_poison = point.y - point.y;
    for (int corner = 0; corner < 4; ++corner) {
      corners.index[corner] = -1;
      corners.weight[corner] = x_poison + y_poison;
      corners.weight_dx[corner] = y_poison;
      corners.weight_dy[corner] = x_poison;
    }
    return corners;
  }
  const int64_t x0 = point.x0;
  const int64_t y0 = point.y0;
  const acc_t lx = point.lx;
  const acc_t ly = point.ly;
  const acc_t hx = static_cast<acc_t>(1) - lx;
  const acc_t hy = static_cast<acc_t>(1) - ly;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const acc_t weights[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const acc_t weights_dx[4] = {-hy, hy, -ly, ly};
  const acc_t weights_dy[4] = {-hx, -lx, hx, lx};
  for (int corner = 0; corner < 4; ++corner) {
    const bool inside = xs[corner] >= 0 && xs[corner] < width && ys[corner] >= 0 && ys[corner] < height;
    corners.index[corner] = inside ? ys[corner] * width + xs[corner] : -1;
    corners.weight[corner] = weights[corner];
    corners.weight_dx[corner] = weights_dx[corner];
    corners.weight_dy[corner] = weights_dy[corner];
  }
  return corners;
}

// Whether a level of height x width whose first value row is `start` lies within value's num_values rows, without
// overflow. This is all that memory safety needs: the kernels test it per level, while the full layout check
// (exclusive cumulative sum, sum == num_values) runs in Python, once per transformer forward.
C10_HOST_DEVICE inline bool level_fits(int64_t height, int64_t width, int64_t start, int64_t num_values) {
  return height >= 0 && width >= 0 && start >= 0 && start <= num_values &&
         (width == 0 || height <= (num_values - start) / width);
}

// What a sample's outside corners add to the output, attention * weight * 0 summed: 0, or NaN when one of those
// products is not finite (a non-finite location, or a NaN/inf attention on a point off the map).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t outside_contribution(const BilinearCorners<acc_t>& corners, acc_t attention) {
  acc_t total = 0;
  for (int corner = 0; corner < 4; ++corner) {
    if (corners.index[corner] < 0) {
      total += attention * corners.weight[corner] * static_cast<acc_t>(0);
    }
  }
  return total;
}

}  // namespace salience_detr
