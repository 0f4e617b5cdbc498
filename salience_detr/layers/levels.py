"""Multi-scale layout helpers: how per-level maps become one token sequence and back.

Levels are flattened row-major and concatenated finest first; ``spatial_shapes`` (L, 2) holds each level's (H, W)
and ``level_start_index`` (L,) the offset of its first token, as the deformable-attention op expects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """(B,C,H,W) per level -> (B, sum H*W, C); (B,H,W) masks -> (B, sum H*W). Row-major, level by level."""
    if len(maps) == 0:
        raise ValueError("flatten_levels needs at least one level, got an empty list.")
    flat = torch.cat([m.flatten(-2) for m in maps], -1)
    return flat.transpose(1, 2) if flat.ndim == 3 else flat


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


def level_valid_sizes(level_mask: Tensor) -> Tensor:
    """Valid (width, height) in cells per image, counted on row 0 / column 0 of a (B,H,W) padding mask."""
    valid_w = (~level_mask[:, 0, :]).sum(1)
    valid_h = (~level_mask[:, :, 0]).sum(1)
    return torch.stack([valid_w, valid_h], -1)


def valid_ratios(level_masks: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """(B, L, 2) valid fraction of each level as (w, h): the unpadded extent over the map size."""
    valid = torch.stack([level_valid_sizes(mask) for mask in level_masks], 1).to(dtype)  # (B, L, 2) cells
    extents = [(mask.shape[-1], mask.shape[-2]) for mask in level_masks]
    return valid / torch.as_tensor(extents, dtype=dtype, device=valid.device)  # one division for every level
