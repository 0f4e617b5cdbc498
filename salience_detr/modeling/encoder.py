"""Salience-filtered deformable encoder (docs/model.md#encoder-state to #background-embedding).

Each layer updates only its prefix of the salience ranking: the selected tokens first exchange information
through plain multi-head attention among the most confident of them, then sample the *un-encoded* input
features with multi-scale deformable attention (the value is never updated, unlike Deformable DETR), then go
through an FFN. Tokens left untouched by the last layer receive a learned background embedding.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from salience_detr.layers.attention import multihead_self_attention
from salience_detr.layers.levels import cell_coordinates, host_shapes, token_levels
from salience_detr.layers.ms_deform_attn import MultiScaleDeformableAttention
from salience_detr.layers.position_encoding import PositionEmbeddingLearned
from salience_detr.layers.post_norm import PostNormLayer

__all__ = ["SalienceEncoder", "SalienceEncoderLayer", "encoder_reference_points"]


def _gather_tokens(tokens: Tensor, indices: Tensor) -> Tensor:
    """tokens (B, N, ...) at indices (B, M) -> (B, M, ...)."""
    trailing = tokens.shape[2:]
    flat_indices = indices.view(*indices.shape, *(1,) * len(trailing)).expand(-1, -1, *trailing)
    return tokens.gather(1, flat_indices)


class SalienceEncoderLayer(PostNormLayer):
    """Post-norm encoder layer: salience-guided MHA on the top ``topk_sa`` tokens, deformable attention, FFN.

    Sublayer names follow the official checkpoint: ``pre_attention``/``pre_norm``, ``self_attn``/``norm1`` (the
    deformable attention), FFN norm ``norm2``.
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
        topk_sa: int = 300,
    ) -> None:
        super().__init__(
            embed_dim=embed_dim,
            ffn_dim=ffn_dim,
            dropout=dropout,
            attentions=[
                (
                    "pre_attention",
                    nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True),
                    "pre_norm",
                ),
                (
                    "self_attn",
                    MultiScaleDeformableAttention(
                        embed_dim, num_heads=num_heads, num_levels=num_levels, num_points=num_points
                    ),
                    "norm1",
                ),
            ],
            ffn_norm="norm2",
        )
        self.topk_sa = topk_sa
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for the attention projections and FFN weights (biases and deformable attention keep theirs)."""
        self.xavier_init(self.pre_attention)

    def salient_self_attention(self, query: Tensor, query_pos: Tensor, score_tgt: Tensor, foreground: Tensor) -> Tensor:
        """MHA among the ``min(topk_sa, M)`` tokens ranked by max class logit x salience logit; others unchanged."""
        confidence = score_tgt.max(-1).values * foreground
        top = confidence.topk(min(self.topk_sa, query.shape[1]), dim=1).indices
        top = top.unsqueeze(-1).expand(-1, -1, query.shape[-1])
        selected = query.gather(1, top)
        with_pos = selected + query_pos.gather(1, top)
        attended = multihead_self_attention(self.pre_attention, with_pos, selected)
        selected = self.residual("pre_attention", selected, attended)
        return query.scatter(1, top, selected.to(query.dtype))

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        value: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        key_padding_mask: Tensor,
        score_tgt: Tensor,
        foreground: Tensor,
    ) -> Tensor:
        """query/query_pos (B, M, C) selected tokens, value (B, N, C) the un-encoded features, reference_points
        (B, M, L, 2), score_tgt (B, M, K) class logits of the tokens, foreground (B, M) their salience logits."""
        query = self.salient_self_attention(query, query_pos, score_tgt, foreground)
        attended = self.self_attn(
            query + query_pos, reference_points, value, spatial_shapes, level_start_index, key_padding_mask
        )
        query = self.residual("self_attn", query, attended)
        return self.feed_forward(query)


def encoder_reference_points(spatial_shapes: Tensor | Sequence[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Cell centres normalised by each image's valid extent, rescaled per level: (B, N, L, 2) in (x, y) order.

    ``valid_ratios`` is (B, L, 2) in (w, h) order. The arithmetic is Deformable DETR's, element for element
    (``centre / (valid_ratio * size)``, then ``* valid_ratios``), with the levels' centres and scales gathered
    into one division instead of one per level.
    """
    dtype, device = valid_ratios.dtype, valid_ratios.device
    shapes = host_shapes(spatial_shapes)
    sizes = torch.as_tensor([(width, height) for height, width in shapes], dtype=dtype, device=device)
    scale = (valid_ratios * sizes).index_select(1, token_levels(shapes, device))  # (B, N, 2): valid_ratio * size
    return (cell_coordinates(shapes, 0.5, dtype, device) / scale)[:, :, None] * valid_ratios[:, None]


class SalienceEncoder(nn.Module):
    """Stack of salience encoder layers over a fixed token ranking, plus the background embedding.

    ``enhance_mcsp`` (the class head scoring tokens for the pre-attention) is None until the transformer
    assigns its ``encoder_class_head`` to it, so both state-dict keys hold the same tensors as in the official model.
    """

    def __init__(
        self,
        layer: SalienceEncoderLayer,
        num_layers: int = 6,
        max_num_embedding: int = 200,
        *,
        embed_dim: int = 256,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        if layer.embed_dim != embed_dim:
            raise ValueError(f"layer.embed_dim ({layer.embed_dim}) must equal embed_dim ({embed_dim})")
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        for copied in self.layers:
            copied.reset_parameters()
        self.background_embedding = PositionEmbeddingLearned(max_num_embedding, embed_dim // 2)
        self.enhance_mcsp: nn.Module | None = None

    def _check_inputs(
        self, feat_flatten: Tensor, layer_indices: Sequence[Tensor], shapes: Sequence[tuple[int, int]]
    ) -> None:
        if self.enhance_mcsp is None:
            raise RuntimeError(
                "SalienceEncoder.enhance_mcsp is not set: assign the transformer's encoder_class_head to it "
                "(encoder.enhance_mcsp = encoder_class_head) before running the encoder"
            )
        if len(layer_indices) != self.num_layers:
            raise ValueError(
                f"layer_indices must hold one index tensor per layer ({self.num_layers}), got {len(layer_indices)}"
            )
        num_tokens = sum(height * width for height, width in shapes)
        if feat_flatten.dim() != 3 or feat_flatten.shape[1:] != (num_tokens, self.embed_dim):
            raise ValueError(
                f"feat_flatten must be (B, {num_tokens}, {self.embed_dim}) to match spatial_shapes, "
                f"got {tuple(feat_flatten.shape)}"
            )

    def background(self, spatial_shapes: Tensor | Sequence[tuple[int, int]]) -> Tensor:
        """Learned background embedding of every token, levels flattened row-major and concatenated: (N, C)."""
        return self.background_embedding.cells(host_shapes(spatial_shapes))

    def forward(
        self,
        feat_flatten: Tensor,
        pos: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        mask_flatten: Tensor,
        foreground_score: Tensor,
        focus_token_nums: Tensor,
        layer_indices: Sequence[Tensor],
        shapes: Sequence[tuple[int, int]] | None = None,
    ) -> Tensor:
        """Update each layer's selected tokens in place of the running memory; return memory (B, N, C).

        Rows of a layer's selection beyond an image's own budget ``focus_token_nums[b]`` (the batch-max padding of
        smaller images) are computed but not written back, as in the official per-image scatter. ``shapes``: the
        values of ``spatial_shapes`` on the host (read from the tensor when not given, one sync).
        """
        shapes = host_shapes(spatial_shapes) if shapes is None else shapes
        self._check_inputs(feat_flatten, layer_indices, shapes)
        reference_points = encoder_reference_points(shapes, valid_ratios)
        output = feat_flatten
        for layer, indices in zip(self.layers, layer_indices):
            if indices.shape[1] == 0:
                continue
            token_index = indices.unsqueeze(-1).expand(-1, -1, output.shape[-1])  # for the gathers and the scatter
            query = output.gather(1, token_index)
            updated = layer(
                query,
                pos.gather(1, token_index),
                feat_flatten,
                _gather_tokens(reference_points, indices),
                spatial_shapes,
                level_start_index,
                mask_flatten,
                self.enhance_mcsp(query),
                foreground_score.gather(1, indices),
            )
            rank = torch.arange(indices.shape[1], device=indices.device)
            within_budget = (rank[None] < focus_token_nums[:, None].to(indices.device)).unsqueeze(-1)
            updated = torch.where(within_budget, updated.to(output.dtype), query)
            if torch.is_grad_enabled() or output is feat_flatten:  # feat_flatten is every layer's value: kept
                output = output.scatter(1, token_index, updated)
            else:  # without autograd, the running memory is this loop's own: no (B, N, C) copy per layer
                output.scatter_(1, token_index, updated)

        # the background embedding goes to the unpadded tokens that the last layer did not update: one (B, N) mask
        untouched = (~mask_flatten).scatter(1, layer_indices[-1], 0)  # 0 = False (a bool value does not trace)
        return output + self.background(shapes).to(output.dtype) * untouched.unsqueeze(-1)
