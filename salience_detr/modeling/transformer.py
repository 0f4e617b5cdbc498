"""SalienceTransformer: salience scoring, filtered encoder, transformer neck, two-stage selection, decoder.

Owns exactly the official ``transformer.*`` state-dict entries (docs/model.md#state-dict).
Data flow (docs/model.md#level-embedding to #decoder):
flatten levels -> salience input memory (enc_output + LN of feature + position + level embedding) ->
top-down salience maps -> token ranking -> SalienceEncoder -> optional RepVGG neck -> proposals + grid NMS ->
queries (learned content, detached encoder boxes), denoising queries prepended in training -> decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from salience_detr.layers import levels
from salience_detr.layers.mlp import MLP, init_box_head, init_class_head
from salience_detr.layers.ms_deform_attn import check_level_layout

from .decoder import SalienceDecoder
from .denoising import DenoisingQueries
from .encoder import SalienceEncoder
from .salience import MaskPredictor, salience_maps, select_salient_tokens
from .two_stage import encoder_output_proposals, select_proposals

ALPHA_INIT_RANGE = 0.3


@dataclass
class TransformerOutput:
    """Everything the meta-architecture needs for losses, post-processing and visualisation.

    ``pred_logits``/``pred_boxes`` stack all decoder layers (num_layers, B, D + Q', ...), denoising queries first;
    ``query_features`` (B, D + Q', C) are the last layer's normalised query features (the RoI head's input).
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    query_features: Tensor
    enc_logits: Tensor
    enc_boxes: Tensor
    salience: list[Tensor]
    layer_indices: list[Tensor]
    query_index: Tensor
    spatial_shapes: Tensor
    denoising: DenoisingQueries | None


class SalienceTransformer(nn.Module):
    """The transformer of Salience DETR, with its two-stage heads and query selection."""

    def __init__(
        self,
        encoder: SalienceEncoder,
        neck: nn.Module | None,
        decoder: SalienceDecoder,
        *,
        num_classes: int = 80,
        num_levels: int = 4,
        num_queries: int = 900,
        embed_dim: int = 256,
        level_filter_ratio: tuple[float, ...] = (0.4, 0.8, 1.0, 1.0),
        layer_filter_ratio: tuple[float, ...] = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2),
    ):
        super().__init__()
        if len(level_filter_ratio) != num_levels:
            raise ValueError(
                f"level_filter_ratio has {len(level_filter_ratio)} entries but num_levels={num_levels}; "
                "give one keep ratio per feature level."
            )
        if len(layer_filter_ratio) != len(encoder.layers):
            raise ValueError(
                f"layer_filter_ratio has {len(layer_filter_ratio)} entries but the encoder has {len(encoder.layers)} "
                "layers; give one ratio per encoder layer."
            )
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.num_queries = num_queries

        self.level_embeds = nn.Parameter(torch.empty(num_levels, embed_dim))
        self.alpha = nn.Parameter(torch.empty(num_levels - 1))
        self.register_buffer("level_filter_ratio", torch.tensor(level_filter_ratio, dtype=torch.float32))
        self.register_buffer("layer_filter_ratio", torch.tensor(layer_filter_ratio, dtype=torch.float32))
        self.enc_output = nn.Linear(embed_dim, embed_dim)
        self.enc_output_norm = nn.LayerNorm(embed_dim)
        self.encoder = encoder
        self.neck = neck
        self.decoder = decoder
        self.tgt_embed = nn.Embedding(num_queries, embed_dim)
        self.encoder_class_head = nn.Linear(embed_dim, num_classes)
        self.encoder_bbox_head = MLP(embed_dim, embed_dim, 4, 3)
        # the tie of docs/model.md#encoder-state: the encoder's pre-attention ranks tokens with the two-stage class head
        self.encoder.enhance_mcsp = self.encoder_class_head
        self.enc_mask_predictor = MaskPredictor(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.level_embeds)
        nn.init.uniform_(self.alpha, -ALPHA_INIT_RANGE, ALPHA_INIT_RANGE)
        nn.init.xavier_uniform_(self.enc_output.weight)
        nn.init.zeros_(self.enc_output.bias)
        nn.init.normal_(self.tgt_embed.weight)
        init_class_head(self.encoder_class_head)
        init_box_head(self.encoder_bbox_head)

    def project_memory(self, memory: Tensor, mask_flatten: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """enc_output + LayerNorm of the masked memory, and the anchor logits.

        Described in docs/model.md#proposals; the same projection is the salience input (#salience-scores).
        """
        masked, anchor_logits = encoder_output_proposals(memory, mask_flatten, spatial_shapes)
        return self.enc_output_norm(self.enc_output(masked)), anchor_logits

    def apply_neck(self, memory: Tensor, spatial_shapes: Tensor) -> Tensor:
        """Transformer neck (docs/model.md#transformer-neck) on the memory reshaped per level, flattened again."""
        batch_size = memory.shape[0]
        shapes = spatial_shapes.tolist()
        per_level = memory.split([h * w for h, w in shapes], dim=1)
        maps = [lvl.transpose(1, 2).reshape(batch_size, self.embed_dim, h, w) for lvl, (h, w) in zip(per_level, shapes)]
        return levels.flatten_levels(self.neck(maps))

    def forward(
        self,
        features: list[Tensor],
        level_masks: list[Tensor],
        position_embeddings: list[Tensor],
        make_denoising: Callable[[int], DenoisingQueries] | None = None,
    ) -> TransformerOutput:
        """features/position_embeddings: per level (B,C,H_l,W_l); level_masks (B,H_l,W_l) True=padding.

        make_denoising(num_queries) builds the denoising queries once the number of matching queries Q' is known
        (it can be smaller than num_queries on small inputs); None disables denoising (evaluation).
        """
        if len(features) != self.num_levels:
            raise ValueError(
                f"SalienceTransformer expects {self.num_levels} feature levels, got {len(features)}; "
                "match the neck's num_outs to transformer.num_levels."
            )
        if position_embeddings[0].shape[1] != self.embed_dim:
            raise ValueError(
                f"position embeddings have {position_embeddings[0].shape[1]} channels but embed_dim={self.embed_dim}; "
                "set position_embedding.num_pos_feats to embed_dim // 2."
            )
        feat_flatten = levels.flatten_levels(features)
        mask_flatten = levels.flatten_levels(level_masks)
        lvl_pos = levels.flatten_levels(
            [pos + emb.view(1, -1, 1, 1) for pos, emb in zip(position_embeddings, self.level_embeds)]
        )
        spatial_shapes = torch.as_tensor([f.shape[-2:] for f in features], dtype=torch.long, device=feat_flatten.device)
        level_start_index = levels.level_start_index(spatial_shapes)
        check_level_layout(spatial_shapes, level_start_index, feat_flatten.shape[1])  # once, not in every op call
        valid_ratios = levels.valid_ratios(level_masks, torch.promote_types(feat_flatten.dtype, torch.float32))

        salience_input = self.project_memory(feat_flatten + lvl_pos, mask_flatten, spatial_shapes)[0]
        salience = salience_maps(salience_input, spatial_shapes, level_start_index, self.enc_mask_predictor, self.alpha)
        foreground_score, focus_token_nums, layer_indices = select_salient_tokens(
            salience, level_masks, level_start_index, self.level_filter_ratio, self.layer_filter_ratio
        )
        memory = self.encoder(
            feat_flatten,
            lvl_pos,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            mask_flatten,
            foreground_score,
            focus_token_nums,
            layer_indices,
        )
        if self.neck is not None:
            memory = self.apply_neck(memory, spatial_shapes)

        output_memory, anchor_logits = self.project_memory(memory, mask_flatten, spatial_shapes)
        enc_logits_all = self.encoder_class_head(output_memory)
        enc_boxes_all = (self.encoder_bbox_head(output_memory) + anchor_logits).sigmoid()
        query_index, enc_logits, enc_boxes = select_proposals(
            enc_logits_all, enc_boxes_all, spatial_shapes, level_start_index, self.num_queries
        )
        num_queries = query_index.shape[1]
        reference_points = enc_boxes.detach()
        target = self.tgt_embed.weight[:num_queries].expand(feat_flatten.shape[0], -1, -1)

        denoising = make_denoising(num_queries) if make_denoising is not None else None
        attn_mask = None
        if denoising is not None:
            target = torch.cat([denoising.label_query.to(target.dtype), target], 1)
            reference_points = torch.cat([denoising.box_query.sigmoid().to(reference_points.dtype), reference_points], 1)
            attn_mask = denoising.attn_mask

        pred_logits, pred_boxes, query_features = self.decoder(
            target,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            key_padding_mask=mask_flatten,
            attn_mask=attn_mask,
        )
        return TransformerOutput(
            pred_logits=pred_logits,
            pred_boxes=pred_boxes,
            query_features=query_features,
            enc_logits=enc_logits,
            enc_boxes=enc_boxes,
            salience=salience,
            layer_indices=layer_indices,
            query_index=query_index,
            spatial_shapes=spatial_shapes,
            denoising=denoising,
        )
