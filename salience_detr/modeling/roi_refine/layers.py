"""The RoI head's layers: the query-to-cells attention layer and the multi-level RoIAlign pooler."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes
from torch import Tensor, nn

from salience_detr.layers.post_norm import PostNormLayer


def level_strides(features: Sequence[Tensor], padded_size: tuple[int, int]) -> list[int]:
    """Power-of-two stride of each level: the finest from the padded image size, then doubling (FPN-style levels)."""
    ratio = padded_size[0] / features[0].shape[-2]
    finest = 2 ** round(math.log2(ratio))
    if finest < 1 or abs(ratio / finest - 1) > 0.25:
        raise ValueError(
            f"feature level 0 of height {features[0].shape[-2]} is not a power-of-two stride of the padded height "
            f"{padded_size[0]}; the RoI head needs FPN-style levels (strides s, 2s, 4s, ...)."
        )
    return [finest * 2**level for level in range(len(features))]


def roi_pooler(
    strides: Sequence[int], resolution: int, sampling_ratio: int, canonical_box_size: int, canonical_level: int
) -> ROIPooler:
    """detectron2's parameter-free RoIAlignV2 pooler over levels of these strides (FPN level assignment)."""
    return ROIPooler(
        output_size=resolution,
        scales=tuple(1.0 / s for s in strides),
        sampling_ratio=sampling_ratio,
        pooler_type="ROIAlignV2",
        canonical_box_size=canonical_box_size,
        canonical_level=canonical_level,
    )


def pool_selected(
    pooler: ROIPooler, features: Sequence[Tensor], rois: Tensor, selected: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """RoIAlign crops (R, C, P, P) of the ``selected`` (B, Q) boxes of ``rois`` (B, Q, 4) absolute xyxy, with
    their batch and query indices in image-major order (the order of ``selected.nonzero()``).

    The same crops as ``pooler`` on per-image box lists, with one host read (the number of boxes per level) where
    the pooler and the selection take six (docs/roi_refine.md): the FPN level of every candidate is assigned with
    detectron2's rule, and the selected boxes are grouped by level with a stable sort.
    """
    num_levels, num_queries = len(pooler.level_poolers), selected.shape[1]
    flat_rois = rois.flatten(0, 1)
    levels = assign_boxes_to_levels(
        [Boxes(flat_rois)], pooler.min_level, pooler.max_level, pooler.canonical_box_size, pooler.canonical_level
    )
    key = torch.where(selected.flatten(), levels, num_levels)  # not selected: after every level
    counts = (key[:, None] == torch.arange(num_levels, device=key.device)).sum(0).tolist()
    by_level = torch.sort(key, stable=True).indices[: sum(counts)]
    image = torch.div(by_level, num_queries, rounding_mode="floor")
    formatted = torch.cat([image.to(flat_rois.dtype)[:, None], flat_rois[by_level]], dim=1)
    pooled = torch.cat(
        [pool(level, boxes) for pool, level, boxes in zip(pooler.level_poolers, features, formatted.split(counts))]
    )
    flat_index = by_level.sort().values
    position = torch.empty_like(key).index_put((by_level,), torch.arange(len(by_level), device=key.device))
    batch_index = torch.div(flat_index, num_queries, rounding_mode="floor")
    return pooled[position[flat_index]], batch_index, flat_index - batch_index * num_queries


class RoIRefineLayer(PostNormLayer):
    """Post-norm layer (as the decoder): the query token attends to the RoI cells, then an FFN refines it."""

    def __init__(self, *, embed_dim: int = 256, ffn_dim: int = 1024, num_heads: int = 8, dropout: float = 0.0):
        super().__init__(
            embed_dim=embed_dim,
            ffn_dim=ffn_dim,
            dropout=dropout,
            attentions=[
                ("cross_attn", nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True), "norm1")
            ],
            ffn_norm="norm2",
        )

    def forward(self, query: Tensor, cells: Tensor, cell_pos: Tensor) -> Tensor:
        """query (R,1,C); cells (R,S,C); cell_pos (S,C) added to the keys only."""
        attended = self.cross_attn(query, cells + cell_pos, cells, need_weights=False)[0]
        return self.feed_forward(self.residual("cross_attn", query, attended))
