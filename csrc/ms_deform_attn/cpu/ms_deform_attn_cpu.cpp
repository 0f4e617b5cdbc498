// CPU kernels, organised for cache locality: a task handles one (batch, head) and walks the levels in the
// outer loop, so its working set is one level of one head's values (under 2 MB at 800x1088 input) rather than
// the whole value tensor. Forward tasks additionally split the queries into blocks (disjoint output slices).
// Backward tasks own the disjoint slice grad_value[b, :, h, :] (accumulated in a contiguous buffer of the task and
// written once) and the location/weight gradients of their samples, so no two threads write the same element (no
// atomics, no races).
// The gathers of value rows are latency bound, so each task works in chunks of queries: first the chunk's corners
// (row pointers and weights) are computed, then the rows are gathered with the rows a few corners ahead
// prefetched. A corner outside the map points at a row of zeros (and, for gradients, a scratch row), so the
// gathers have no branch. Channels are contiguous and the channel loops vectorise; head_dim 32 (the model's) is
// compiled with a fixed channel count. Accumulation is in float (double for double inputs).
#include "../bilinear.h"
#include "../ms_deform_attn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

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

constexpr int64_t kQueryBlock = 256;    // forward: queries per task (disjoint output rows)
constexpr int64_t kChunk = 32;          // queries whose corners are computed before their rows are gathered
constexpr int64_t kPrefetchAhead = 16;  // corners between a row's prefetch and its use
constexpr int64_t kLanes = 8;
constexpr int kFixedDim = 32;  // the head_dim compiled with a constant channel count

// The per-task bodies are compiled twice on x86-64 with GCC (AVX2+FMA and baseline), picked at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SALIENCE_DETR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SALIENCE_DETR_CPU_CLONES
#endif

// The number of channels: a compile-time constant when kDim > 0, so the channel loops unroll and a query's
// channels stay in registers; head_dim otherwise.
template <int kDim>
constexpr int64_t channels(int64_t head_dim) {
  return kDim > 0 ? kDim : head_dim;
}

// Requests the cache lines of a value row that a later corner gathers.
template <typename row_t>
inline void prefetch_row(const row_t* row, int64_t n) {
#if defined(__GNUC__)
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < n * static_cast<int64_t>(sizeof(row_t)); offset += 64) {
    __builtin_prefetch(bytes + offset);
  }
#else
  (void)row;
  (void)n;
#endif
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
  const int64_t lanes_end = n - n % kLanes;
  for (int64_t c = 0; c < lanes_end; c += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      partial[lane] += grad[c + lane] * static_cast<acc_t>(row[c + lane]);
      grad_row[c + lane] += scale * grad[c + lane];
    }
  }
  for (int64_t c = lanes_end; c < n; ++c) {
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
  scalar_t* grad_value;
  scalar_t* grad_loc;
  scalar_t* grad_attn;

  int64_t level_offset(int64_t b, int64_t head, int64_t level) const {
    return ((b * s.num_values + levels->start[level]) * s.num_heads + head) * s.head_dim;
  }
  int64_t first_sample(int64_t b, int64_t query, int64_t head, int64_t level) const {
    return (((b * s.num_queries + query) * s.num_heads + head) * s.num_levels + level) * s.num_points;
  }
  BilinearCorners<acc_t> corners(int64_t sample, int64_t level) const {
    return bilinear_corners<acc_t>(
        locations[2 * sample], locations[2 * sample + 1], levels->height[level], levels->width[level]);
  }
};

// One chunk of queries at one level of one (batch, head): per corner, in sample order, the value row it reads
// (the zero row when outside the map), the gradient row it writes (a scratch row when outside), its weights.
// The row arrays have kPrefetchAhead extra entries (the zero row), so prefetching ahead needs no bound check.
template <typename scalar_t>
struct ChunkCorners {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<const scalar_t*> rows;
  std::vector<acc_t*> grad_rows;
  std::vector<acc_t> weight, weight_dx, weight_dy, attention;
  std::vector<scalar_t> zero_row;
  std::vector<acc_t> scratch_row;

  ChunkCorners(const MsDeformAttnSizes& s, bool backward)
      : rows(kChunk * s.num_points * 4 + kPrefetchAhead),
        weight(kChunk * s.num_points * 4),
        attention(kChunk * s.num_points),
        zero_row(s.head_dim, scalar_t(0)) {
    std::fill(rows.begin(), rows.end(), zero_row.data());
    if (backward) {
      scratch_row.resize(s.head_dim);
      grad_rows.assign(rows.size(), scratch_row.data());
      weight_dx.resize(weight.size());
      weight_dy.resize(weight.size());
    }
  }
};

// Raw pointers into a ChunkCorners, held by value while filling: the compiler then knows that storing a row
// pointer does not move them (through the vectors it would reload them after every store).
template <typename scalar_t>
struct CornerArrays {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t** rows;
  acc_t** grad_rows;
  acc_t* weight;
  acc_t* weight_dx;
  acc_t* weight_dy;
  const scalar_t* zero_row;
  acc_t* scratch_row;

  explicit CornerArrays(ChunkCorners<scalar_t>& chunk)
      : rows(chunk.rows.data()),
        grad_rows(chunk.grad_rows.data()),
        weight(chunk.weight.data()),
        weight_dx(chunk.weight_dx.data()),
        weight_dy(chunk.weight_dy.data()),
        zero_row(chunk.zero_row.data()),
        scratch_row(chunk.scratch_row.data()) {}
};

// The corners of a point off the map (none inside, weights possibly NaN): zero rows, scratch gradient rows.
template <typename scalar_t, bool kBackward>
inline void fill_outside_corners(
    const CornerArrays<scalar_t>& out,
    int64_t k,
    const BilinearCorners<at::opmath_type<scalar_t>>& corners,
    at::opmath_type<scalar_t> attention) {
  for (int corner = 0; corner < 4; ++corner) {
    out.rows[k + corner] = out.zero_row;
    if constexpr (kBackward) {
      out.grad_rows[k + corner] = out.scratch_row;
      out.weight[k + corner] = corners.weight[corner];
      out.weight_dx[k + corner] = corners.weight_dx[corner];
      out.weight_dy[k + corner] = corners.weight_dy[corner];
    } else {
      out.weight[k + corner] = attention * corners.weight[corner];
    }
  }
}

// One level's geometry for fill_near_corners: its value and gradient rows, and each corner's element offset from
// the top-left corner in both (computed once per level, so a corner's row costs an addition).
template <typename scalar_t>
struct LevelRows {
  const scalar_t* value;
  at::opmath_type<scalar_t>* grad;
  int64_t width, height, pixel_stride, grad_stride;
  int64_t value_step[4], grad_step[4];

  LevelRows(
      const scalar_t* value,
      at::opmath_type<scalar_t>* grad,
      int64_t width,
      int64_t height,
      int64_t pixel_stride,
      int64_t grad_stride)
      : value(value),
        grad(grad),
        width(width),
        height(height),
        pixel_stride(pixel_stride),
        grad_stride(grad_stride),
        value_step{0, pixel_stride, width * pixel_stride, (width + 1) * pixel_stride},
        grad_step{0, grad_stride, width * grad_stride, (width + 1) * grad_stride} {}
};

// The corners of a point near the map with their bilinear_corners weights (same expressions), its four corners
// tested by four comparisons.
template <typename scalar_t, bool kBackward>
inline void fill_near_corners(
    const CornerArrays<scalar_t>& out,
    int64_t k,
    const BilinearPoint<at::opmath_type<scalar_t>>& point,
    at::opmath_type<scalar_t> attention,
    const LevelRows<scalar_t>& level) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t lx = point.lx, ly = point.ly, hx = acc_t(1) - lx, hy = acc_t(1) - ly;
  const bool left = point.x0 >= 0, right = point.x0 + 1 < level.width;
  const bool top = point.y0 >= 0, bottom = point.y0 + 1 < level.height;
  const bool inside[4] = {top && left, top && right, bottom && left, bottom && right};
  const int64_t pixel = point.y0 * level.width + point.x0;
  const int64_t value_offset = pixel * level.pixel_stride, grad_offset = pixel * level.grad_stride;
  const acc_t weights[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  for (int corner = 0; corner < 4; ++corner) {
    out.rows[k + corner] = inside[corner] ? level.value + (value_offset + level.value_step[corner]) : out.zero_row;
    if constexpr (kBackward) {
      out.grad_rows[k + corner] =
          inside[corner] ? level.grad + (grad_offset + level.grad_step[corner]) : out.scratch_row;
      out.weight[k + corner] = weights[corner];
    } else {
      out.weight[k + corner] = attention * weights[corner];
    }
  }
  if constexpr (kBackward) {
    const acc_t weights_dx[4] = {-hy, hy, -ly, ly};
    const acc_t weights_dy[4] = {-hx, -lx, hx, lx};
    for (int corner = 0; corner < 4; ++corner) {
      out.weight_dx[k + corner] = weights_dx[corner];
      out.weight_dy[k + corner] = weights_dy[corner];
    }
  }
}

// Fills the chunk's corners of queries [first_query, last_query); forward weights include the attention. In the
// backward the gradient rows lie in slice_grad, the task's (num_values, head_dim) buffer.
template <typename scalar_t, bool kBackward>
SALIENCE_DETR_CPU_CLONES void fill_corners(
    ChunkCorners<scalar_t>& chunk,
    const KernelArgs<scalar_t>& args,
    int64_t b,
    int64_t head,
    int64_t level,
    int64_t first_query,
    int64_t last_query,
    at::opmath_type<scalar_t>* slice_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = args.s.head_dim, width = args.levels->width[level], height = args.levels->height[level];
  const int64_t pixel_stride = args.s.num_heads * n, num_points = args.s.num_points;
  const int64_t query_stride = args.s.num_heads * args.s.num_levels * num_points;
  const LevelRows<scalar_t> level_rows(
      args.value + args.level_offset(b, head, level), kBackward ? slice_grad + args.levels->start[level] * n : nullptr,
      width, height, pixel_stride, n);
  const scalar_t* locations = args.locations;
  const scalar_t* attention_weights = args.weights;
  const CornerArrays<scalar_t> out(chunk);
  acc_t* attention = chunk.attention.data();
  int64_t k = 0, j = 0;
  for (int64_t first_sample = args.first_sample(b, first_query, head, level),
               end = first_sample + (last_query - first_query) * query_stride;
       first_sample < end; first_sample += query_stride) {
    for (int64_t sample = first_sample; sample < first_sample + num_points; ++sample, ++j, k += 4) {
      attention[j] = static_cast<acc_t>(attention_weights[sample]);
      const BilinearPoint<acc_t> point = bilinear_point<acc_t>(
          static_cast<acc_t>(locations[2 * sample]), static_cast<acc_t>(locations[2 * sample + 1]), height, width);
      if (point.near_map) {
        fill_near_corners<scalar_t, kBackward>(out, k, point, attention[j], level_rows);
      } else {
        fill_outside_corners<scalar_t, kBackward>(out, k, args.corners(sample, level), attention[j]);
      }
    }
  }
  std::fill(out.rows + k, out.rows + k + kPrefetchAhead, out.zero_row);
}

// accumulator[q] += the weighted rows of query q's corners, for the chunk's queries. An outside corner adds
// weight * 0: nothing, or NaN when the weight or the attention is not finite, as in the reference.
template <typename scalar_t, int kDim>
SALIENCE_DETR_CPU_CLONES void gather_chunk(
    const ChunkCorners<scalar_t>& corners,
    int64_t num_queries,
    int64_t corners_per_query,
    int64_t head_dim,
    at::opmath_type<scalar_t>* accumulator) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = channels<kDim>(head_dim);
  for (int64_t query = 0; query < num_queries; ++query) {
    acc_t* query_accumulator = accumulator + query * n;
    acc_t local[kDim > 0 ? kDim : 1];
    acc_t* acc = kDim > 0 ? local : query_accumulator;
    if constexpr (kDim > 0) {
      std::copy(query_accumulator, query_accumulator + n, local);
    }
    for (int64_t k = query * corners_per_query; k < (query + 1) * corners_per_query; ++k) {
      prefetch_row(corners.rows[k + kPrefetchAhead], n);
      const scalar_t* row = corners.rows[k];
      const acc_t scale = corners.weight[k];
      for (int64_t c = 0; c < n; ++c) {
        acc[c] += scale * static_cast<acc_t>(row[c]);
      }
    }
    if constexpr (kDim > 0) {
      std::copy(local, local + n, query_accumulator);
    }
  }
}

// Output rows [first_query, last_query) of head `head` in image `b`, accumulated level by level.
template <typename scalar_t, int kDim>
void forward_query_block(
    const KernelArgs<scalar_t>& args,
    int64_t b,
    int64_t head,
    int64_t first_query,
    int64_t last_query,
    ChunkCorners<scalar_t>& corners,
    at::opmath_type<scalar_t>* accumulator) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsDeformAttnSizes& s = args.s;
  const int64_t n = channels<kDim>(s.head_dim);
  std::fill(accumulator, accumulator + (last_query - first_query) * n, acc_t(0));
  for (int64_t level = 0; level < s.num_levels; ++level) {
    for (int64_t chunk = first_query; chunk < last_query; chunk += kChunk) {
      const int64_t chunk_end = std::min(chunk + kChunk, last_query);
      fill_corners<scalar_t, false>(corners, args, b, head, level, chunk, chunk_end, nullptr);
      gather_chunk<scalar_t, kDim>(
          corners, chunk_end - chunk, 4 * s.num_points, n, accumulator + (chunk - first_query) * n);
    }
  }
  for (int64_t query = first_query; query < last_query; ++query) {
    scalar_t* query_out = args.out + ((b * s.num_queries + query) * s.num_heads + head) * n;
    const acc_t* query_accumulator = accumulator + (query - first_query) * n;
    for (int64_t c = 0; c < n; ++c) {
      query_out[c] = static_cast<scalar_t>(query_accumulator[c]);
    }
  }
}

// Location and weight gradients of the chunk's samples, and their rows' contributions to grad_value.
template <typename scalar_t, int kDim>
SALIENCE_DETR_CPU_CLONES void backward_chunk(
    const KernelArgs<scalar_t>& args,
    const ChunkCorners<scalar_t>& corners,
    int64_t b,
    int64_t head,
    int64_t level,
    int64_t first_query,
    int64_t last_query) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsDeformAttnSizes& s = args.s;
  const int64_t n = channels<kDim>(s.head_dim);
  const acc_t width = static_cast<acc_t>(args.levels->width[level]);
  const acc_t height = static_cast<acc_t>(args.levels->height[level]);
  acc_t grad_local[kDim > 0 ? kDim : 1];
  std::vector<acc_t> grad_buffer(kDim > 0 ? 0 : n);
  acc_t* grad = kDim > 0 ? grad_local : grad_buffer.data();
  int64_t k = 0;
  for (int64_t query = first_query; query < last_query; ++query) {
    const scalar_t* query_grad_out = args.grad_out + ((b * s.num_queries + query) * s.num_heads + head) * n;
    for (int64_t c = 0; c < n; ++c) {
      grad[c] = static_cast<acc_t>(query_grad_out[c]);
    }
    const int64_t first_sample = args.first_sample(b, query, head, level);
    for (int64_t point = 0; point < s.num_points; ++point) {
      const acc_t attention = corners.attention[(query - first_query) * s.num_points + point];
      acc_t grad_attention = 0, grad_x = 0, grad_y = 0;
      for (int corner = 0; corner < 4; ++corner, ++k) {
        prefetch_row(corners.rows[k + kPrefetchAhead], n);
        prefetch_row(corners.grad_rows[k + kPrefetchAhead], n);
        // an outside corner reads zeros (dot 0) and writes the scratch row; its weights still multiply the dot
        const acc_t dot =
            dot_and_scaled_add(grad, corners.rows[k], corners.grad_rows[k], attention * corners.weight[k], n);
        grad_attention += corners.weight[k] * dot;
        grad_x += corners.weight_dx[k] * dot;
        grad_y += corners.weight_dy[k] * dot;
      }
      args.grad_attn[first_sample + point] = static_cast<scalar_t>(grad_attention);
      args.grad_loc[2 * (first_sample + point)] = static_cast<scalar_t>(attention * grad_x * width);
      args.grad_loc[2 * (first_sample + point) + 1] = static_cast<scalar_t>(attention * grad_y * height);
    }
  }
}

// All gradients of head `head` in image `b`: grad_value[b, :, head, :] and its samples' location/weight grads.
// grad_value's slice is accumulated in slice_grad, contiguous rows that stay in cache better than the strided
// slice, and written once at the end (so grad_value needs neither zeroing nor a conversion pass).
template <typename scalar_t, int kDim>
void backward_head_slice(
    const KernelArgs<scalar_t>& args,
    int64_t b,
    int64_t head,
    ChunkCorners<scalar_t>& corners,
    at::opmath_type<scalar_t>* slice_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const MsDeformAttnSizes& s = args.s;
  const int64_t n = channels<kDim>(s.head_dim);
  std::fill(slice_grad, slice_grad + s.num_values * n, acc_t(0));
  for (int64_t level = 0; level < s.num_levels; ++level) {
    for (int64_t chunk = 0; chunk < s.num_queries; chunk += kChunk) {
      const int64_t chunk_end = std::min(chunk + kChunk, s.num_queries);
      fill_corners<scalar_t, true>(corners, args, b, head, level, chunk, chunk_end, slice_grad);
      backward_chunk<scalar_t, kDim>(args, corners, b, head, level, chunk, chunk_end);
    }
  }
  for (int64_t pixel = 0; pixel < s.num_values; ++pixel) {
    scalar_t* grad_row = args.grad_value + ((b * s.num_values + pixel) * s.num_heads + head) * n;
    for (int64_t c = 0; c < n; ++c) {
      grad_row[c] = static_cast<scalar_t>(slice_grad[pixel * n + c]);
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

template <typename scalar_t, int kDim>
void forward_kernel(const MsDeformAttnInputs& in, const LevelLayout& levels, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  KernelArgs<scalar_t> args = kernel_args<scalar_t>(in, levels);
  args.out = output.mutable_data_ptr<scalar_t>();
  const MsDeformAttnSizes s = in.sizes;
  const int64_t query_blocks = (s.num_queries + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, s.batch * s.num_heads * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> accumulator(kQueryBlock * s.head_dim);
    ChunkCorners<scalar_t> corners(s, false);
    for (int64_t task = begin; task < end; ++task) {  // task = (b * H + h) * query_blocks + block
      const int64_t first_query = task % query_blocks * kQueryBlock;
      forward_query_block<scalar_t, kDim>(
          args, task / (s.num_heads * query_blocks), task / query_blocks % s.num_heads, first_query,
          std::min(first_query + kQueryBlock, s.num_queries), corners, accumulator.data());
    }
  });
}

template <typename scalar_t, int kDim>
void backward_kernel(
    const MsDeformAttnInputs& in,
    const LevelLayout& levels,
    const at::Tensor& grad_output,
    at::Tensor& grad_value,
    at::Tensor& grad_locations,
    at::Tensor& grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  KernelArgs<scalar_t> args = kernel_args<scalar_t>(in, levels);
  args.grad_out = grad_output.const_data_ptr<scalar_t>();
  args.grad_value = grad_value.mutable_data_ptr<scalar_t>();
  args.grad_loc = grad_locations.mutable_data_ptr<scalar_t>();
  args.grad_attn = grad_weights.mutable_data_ptr<scalar_t>();
  const MsDeformAttnSizes s = in.sizes;
  at::parallel_for(0, s.batch * s.num_heads, 1, [&](int64_t begin, int64_t end) {
    ChunkCorners<scalar_t> corners(s, true);
    std::vector<acc_t> slice_grad(s.num_values * s.head_dim);
    for (int64_t slice = begin; slice < end; ++slice) {  // slice = b * H + h
      backward_head_slice<scalar_t, kDim>(args, slice / s.num_heads, slice % s.num_heads, corners, slice_grad.data());
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
    if (s.head_dim == kFixedDim) {
      forward_kernel<scalar_t, kFixedDim>(in, levels, output);
    } else {
      forward_kernel<scalar_t, 0>(in, levels, output);
    }
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
  at::Tensor grad_value = at::empty(in.value.sizes(), in.value.options());
  at::Tensor grad_locations = at::empty(in.sampling_locations.sizes(), in.sampling_locations.options());
  at::Tensor grad_weights = at::empty(in.attention_weights.sizes(), in.attention_weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    if (in.sizes.head_dim == kFixedDim) {
      backward_kernel<scalar_t, kFixedDim>(in, levels, grad_out, grad_value, grad_locations, grad_weights);
    } else {
      backward_kernel<scalar_t, 0>(in, levels, grad_out, grad_value, grad_locations, grad_weights);
    }
  });
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace salience_detr
