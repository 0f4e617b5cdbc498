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


def pool_rows(pooler: ROIPooler, features: Sequence[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
    """RoIAlign crops (R, C, P, P) of ``boxes`` (R, 4) absolute xyxy on images ``batch_index`` (R,), each from the
    level detectron2's FPN rule assigns it: the crops of ``pooler`` on per-image box lists, bit for bit.

    Without a host read of the boxes per level (docs/roi_refine.md#pooling): every level's RoIAlign takes all R
    rows, those of other levels as an empty box (no samples with the adaptive sampling ratio), and each row keeps
    its own level's crop. RoIAlign crops each box independently, so the kept crops are those of a per-level call.
    """
    levels = assign_boxes_to_levels(
        [Boxes(boxes)], pooler.min_level, pooler.max_level, pooler.canonical_box_size, pooler.canonical_level
    )
    image = batch_index.to(boxes.dtype)[:, None]
    formatted = torch.cat([image, boxes], dim=1)
    empty = torch.cat([image, torch.zeros_like(boxes)], dim=1)
    pooled = None
    for level, (pool, feature) in enumerate(zip(pooler.level_poolers, features)):
        here = (levels == level)[:, None]
        crops = pool(feature, torch.where(here, formatted, empty))
        pooled = crops if pooled is None else torch.where(here[:, :, None, None], crops, pooled)
    return pooled


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
