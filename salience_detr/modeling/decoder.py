"""Deformable decoder with iterative box refinement and look-forward-twice (docs/model.md#decoder).

Nothing here is salience-specific: it is the DINO-style decoder the official checkpoints were trained with,
including one quirk kept on purpose: the next layer's reference box is refined from the *un-normalised* query,
while the boxes that are supervised come from ``norm(query)``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from salience_detr.layers.attention import additive_mask, multihead_self_attention
from salience_detr.layers.box_ops import inverse_sigmoid
from salience_detr.layers.mlp import MLP, init_box_head, init_class_head
from salience_detr.layers.ms_deform_attn import MultiScaleDeformableAttention
from salience_detr.layers.position_encoding import get_sine_pos_embed, sine_frequencies
from salience_detr.layers.post_norm import PostNormLayer


class SalienceDecoderLayer(PostNormLayer):
    """Post-norm decoder layer: self-attention -> deformable cross-attention -> FFN.

    Attribute names follow the official checkpoint: ``self_attn``/``norm2`` for self-attention,
    ``cross_attn``/``norm1`` for cross-attention (built first, as there) and ``norm3`` for the FFN.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        ffn_dim: int = 2048,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__(
            embed_dim=embed_dim,
            ffn_dim=ffn_dim,
            dropout=dropout,
            attentions=[
                (
                    "cross_attn",
                    MultiScaleDeformableAttention(
                        embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
                    ),
                    "norm1",
                ),
                ("self_attn", nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True), "norm2"),
            ],
            ffn_norm="norm3",
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.xavier_init(self.self_attn)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        key_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """query, query_pos (B,Q,C); reference_points (B,Q,L,4); value (B,N,C); self_attn_mask (Q,Q) True=blocked,
        or already the float mask of :func:`additive_mask` (the decoder converts it once for all its layers)."""
        if self_attn_mask is not None and self_attn_mask.dtype == torch.bool:
            self_attn_mask = additive_mask(self_attn_mask, query.dtype)
        attended = multihead_self_attention(self.self_attn, query + query_pos, query, self_attn_mask)
        query = self.residual("self_attn", query, attended)

        sampled = self.cross_attn(
            query + query_pos, reference_points, value, spatial_shapes, level_start_index, key_padding_mask
        )
        query = self.residual("cross_attn", query, sampled)
        return self.feed_forward(query)


class SalienceDecoder(nn.Module):
    """Stack of decoder layers with per-layer class/box heads and iterative box refinement (docs/model.md#decoder).

    Returns the stacked logits (num_layers, B, Q, K), boxes (num_layers, B, Q, 4) normalized cxcywh, and the last
    layer's normalised query features (B, Q, C), which the optional RoI head refines.
    """

    def __init__(self, layer: SalienceDecoderLayer, num_layers: int = 6, num_classes: int = 80):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"SalienceDecoder needs num_layers >= 1, got {num_layers}.")
        self.embed_dim = layer.embed_dim
        self.num_layers = num_layers
        self.num_classes = num_classes
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.ref_point_head = MLP(2 * self.embed_dim, self.embed_dim, self.embed_dim, 2)
        self.class_head = nn.ModuleList(nn.Linear(self.embed_dim, num_classes) for _ in range(num_layers))
        self.bbox_head = nn.ModuleList(MLP(self.embed_dim, self.embed_dim, 4, 3) for _ in range(num_layers))
        self.norm = nn.LayerNorm(self.embed_dim)
        for class_head in self.class_head:
            init_class_head(class_head)
        for bbox_head in self.bbox_head:
            init_box_head(bbox_head)

    def query_position(self, reference_input: Tensor, rates: Tensor | None = None) -> Tensor:
        """Sine embedding of the level-0 scaled box (order y, x, w, h) through the shared MLP; ``rates``: the
        embedding's ``pair_rates``, which :meth:`forward` builds once for all layers."""
        sine = get_sine_pos_embed(reference_input[:, :, 0, :], num_pos_feats=self.embed_dim // 2, pair_rates=rates)
        return self.ref_point_head(sine)

    def class_logits(self, normed: Tensor) -> Tensor:
        """Each layer's class head on that layer's normalised queries: (num_layers, B, Q, C) -> (num_layers, B, Q, K),
        in one batched matmul over the heads' stacked weights instead of one linear per layer."""
        weight = torch.stack([head.weight for head in self.class_head])
        bias = torch.stack([head.bias for head in self.class_head])
        layers, batch, queries, channels = normed.shape
        logits = torch.baddbmm(bias.unsqueeze(1), normed.view(layers, -1, channels), weight.transpose(1, 2))
        return logits.view(layers, batch, queries, -1)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """query (B,Q,C); reference_points (B,Q,4) sigmoid space; value (B,N,C); valid_ratios (B,L,2) as (w,h)."""
        valid_ratio_scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        embed_dtype = torch.promote_types(reference_points.dtype, valid_ratios.dtype)  # that of reference_input
        rates = sine_frequencies(self.embed_dim // 2, 10000, embed_dtype, reference_points.device)[0::2]
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = additive_mask(attn_mask, query.dtype)
        normed_layers, boxes = [], []
        for index, layer in enumerate(self.layers):
            reference_input = reference_points.detach()[:, :, None] * valid_ratio_scale
            query_pos = self.query_position(reference_input, rates)
            query = layer(
                query, query_pos, reference_input, value, spatial_shapes, level_start_index, key_padding_mask, attn_mask
            )
            normed = self.norm(query)
            normed_layers.append(normed)
            # look-forward-twice: reference_points keeps its graph, so this loss also trains the previous box head
            reference_logits = inverse_sigmoid(reference_points)
            if index == self.num_layers - 1:
                boxes.append((self.bbox_head[index](normed) + reference_logits).sigmoid())
                break
            # one pass of the box head for both inputs: the official code refines the next reference from the
            # un-normalised query (not `normed`), and from the detached reference: the same logits, without their graph
            deltas, refine = self.bbox_head[index](torch.stack([normed, query])).unbind(0)
            boxes.append((deltas + reference_logits).sigmoid())
            reference_points = (refine + reference_logits.detach()).sigmoid()
        return self.class_logits(torch.stack(normed_layers)), torch.stack(boxes), normed
