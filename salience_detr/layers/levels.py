"""Multi-scale layout helpers: how per-level maps become one token sequence and back.

Levels are flattened row-major and concatenated finest first; ``spatial_shapes`` (L, 2) holds each level's (H, W)
and ``level_start_index`` (L,) the offset of its first token, as the deformable-attention op expects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """(B,C,H,W) per level -> (B, sum H*W, C); (B,H,W) masks -> (B, sum H*W). Row-major, level by level.

    The result is contiguous (the concatenation writes it token-major), so the linear layers that read the tokens
    (every deformable attention's value projection) need no copy of their own; channels-last maps are read in order.
    """
    if len(maps) == 0:
        raise ValueError("flatten_levels needs at least one level, got an empty list.")
    if maps[0].ndim == 3:
        return torch.cat([m.flatten(-2) for m in maps], -1)
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)


def level_start_index(spatial_shapes: Tensor) -> Tensor:
    """(L,) offset of each level's first token in the flattened sequence, from the (L, 2) map sizes."""
    if spatial_shapes.ndim != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2) as (H, W) per level, got {tuple(spatial_shapes.shape)}.")
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def host_shapes(spatial_shapes: Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Each level's (H, W) as Python ints: free for the host list the model carries, one value read for a tensor."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(height), int(width)) for height, width in spatial_shapes]


def host_ints(values: Tensor | Sequence[int]) -> list[int]:
    """A 1-D index (``level_start_index``) as Python ints: free for a host list, one value read for a tensor."""
    return [int(value) for value in (values.tolist() if isinstance(values, Tensor) else values)]


def host_starts(shapes: Sequence[tuple[int, int]]) -> list[int]:
    """The values of ``level_start_index`` computed on the host from the (H, W) of each level."""
    starts, offset = [], 0
    for height, width in shapes:
        starts.append(offset)
        offset += height * width
    return starts


def token_levels(shapes: Sequence[tuple[int, int]], device: torch.device | str) -> Tensor:
    """(N,) int64 level of every token of the flattened sequence: built on the host and moved in one call."""
    sizes = [height * width for height, width in shapes]
    return torch.as_tensor(np.repeat(np.arange(len(shapes)), sizes), device=device)


def host_cell_coordinates(shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    """(N, 2) integer ``(x, y)`` of every cell of every level, row-major, levels concatenated, on the host."""
    cells = [np.stack(np.meshgrid(np.arange(width), np.arange(height)), -1).reshape(-1, 2) for height, width in shapes]
    return np.concatenate(cells)


def cell_coordinates(
    shapes: Sequence[tuple[int, int]], offset: float, dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """(N, 2) ``(x, y) + offset`` of every cell of every level, row-major, levels concatenated: built on the host and
    moved in one call, not one arange/meshgrid/stack chain per level. Integers plus 0.5 are exact in float32, so
    this equals ``arange + 0.5`` (or ``linspace(0.5, n - 0.5, n)``) on the device."""
    return torch.as_tensor(host_cell_coordinates(shapes) + offset, dtype=dtype, device=device)


def flat_valid_sizes(mask_flatten: Tensor, shapes: Sequence[tuple[int, int]], dtype: torch.dtype) -> Tensor:
    """(B, L, 2) valid (w, h) cells of every level in ``dtype``, counted on row 0 / column 0 of each level's padding
    mask, from the flattened (B, N) mask: each level's row 0 and column 0 in one gather, summed per level by one
    product with a host 0/1 matrix (counts of 0/1 are exact in float; ONNX has no index_add), instead of a chain of
    calls per level."""
    index, segment, start = [], [], 0
    for level, (height, width) in enumerate(shapes):
        index += [*range(start, start + width), *range(start, start + height * width, width)]
        segment += [2 * level] * width + [2 * level + 1] * height
        start += height * width
    device = mask_flatten.device
    segments = np.zeros((len(index), 2 * len(shapes)))
    segments[np.arange(len(index)), segment] = 1.0
    valid = (~mask_flatten.index_select(1, torch.as_tensor(index, device=device))).to(dtype)
    return (valid @ torch.as_tensor(segments, dtype=dtype, device=device)).view(-1, len(shapes), 2)


def valid_ratios(level_masks: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """(B, L, 2) valid fraction of each level as (w, h): the unpadded extent over the map size."""
    shapes = [(mask.shape[-2], mask.shape[-1]) for mask in level_masks]
    flat = torch.cat([mask.flatten(1) for mask in level_masks], 1)
    extents = torch.as_tensor([(width, height) for height, width in shapes], dtype=dtype, device=flat.device)
    return flat_valid_sizes(flat, shapes, dtype) / extents  # one division for every level
