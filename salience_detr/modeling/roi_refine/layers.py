"""The RoI head's layers: the query-to-cells attention layer and the multi-level RoIAlign pooler."""

from __future__ import annotations

import math
from collections.abc import Sequence

from detectron2.modeling.poolers import ROIPooler
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
