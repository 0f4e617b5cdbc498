// Bilinear sampling geometry shared by the CPU and CUDA kernels, so both follow one convention:
// pixel = location * size - 0.5 (align_corners=False), and corners outside the map contribute zero.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace salience_detr {

// The four neighbours of a sampling point: their pixel index within the level (-1 when outside the map),
// their interpolation weights, and the weights' derivatives with respect to the pixel coordinates.
template <typename acc_t>
struct BilinearCorners {
  int64_t index[4];
  acc_t weight[4];
  acc_t weight_dx[4];
  acc_t weight_dy[4];
};

template <typename acc_t>
C10_HOST_DEVICE inline BilinearCorners<acc_t> bilinear_corners(
    acc_t location_x, acc_t location_y, int64_t height, int64_t width) {
  BilinearCorners<acc_t> corners;
  const acc_t x = location_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t y = location_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  // Written so that NaN and points a full pixel or more outside the map take this branch (no corner inside).
  if (!(x > static_cast<acc_t>(-1) && y > static_cast<acc_t>(-1) && x < static_cast<acc_t>(width) &&
        y < static_cast<acc_t>(height))) {
    for (int corner = 0; corner < 4; ++corner) {
      corners.index[corner] = -1;
      corners.weight[corner] = corners.weight_dx[corner] = corners.weight_dy[corner] = static_cast<acc_t>(0);
    }
    return corners;
  }
  const acc_t x_floor = ::floor(x);
  const acc_t y_floor = ::floor(y);
  const int64_t x0 = static_cast<int64_t>(x_floor);
  const int64_t y0 = static_cast<int64_t>(y_floor);
  const acc_t lx = x - x_floor;
  const acc_t ly = y - y_floor;
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

}  // namespace salience_detr
