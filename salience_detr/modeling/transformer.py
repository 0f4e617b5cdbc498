"""SalienceTransformer: salience scoring, filtered encoder, transformer neck, two-stage selection, decoder.

Owns exactly the official ``transformer.*`` state-dict entries (docs/model.md#state-dict).
Data flow (docs/model.md#level-embedding to #decoder):
flatten levels -> salience input memory (enc_output + LN of feature + position + level embedding) ->
top-down salience maps -> token ranking -> SalienceEncoder -> optional RepVGG neck -> proposals + grid NMS ->
queries (learned content, detached encoder boxes), denoising queries prepended in training -> decoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from salience_detr.layers import levels
from salience_detr.layers.mlp import MLP, init_box_head, init_class_head
from salience_detr.layers.ms_deform_attn import check_level_values

from .decoder import SalienceDecoder
from .denoising import DenoisingQueries
from .encoder import SalienceEncoder
from .salience import MaskPredictor, salience_maps, select_salient_tokens
from .two_stage import anchor_proposals, encoder_output_proposals, select_proposals

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


class FlatLevels(NamedTuple):
    """The multi-scale input as one token sequence (levels row-major, finest first) and its layout."""

    tokens: Tensor  # (B, N, C) features
    masks: Tensor  # (B, N) True = padding
    positions: Tensor  # (B, N, C) position + level embeddings
    spatial_shapes: Tensor  # (L, 2) (H, W) per level
    level_start_index: Tensor  # (L,)
    valid_ratios: Tensor  # (B, L, 2) valid fraction as (w, h)
    shapes: tuple[tuple[int, int], ...] = ()  # spatial_shapes on the host: loops over levels read these, no sync
    anchors: tuple[Tensor, Tensor] | None = None  # two_stage.anchor_proposals: (logits (B, N, 4), keep (B, N, 1))


def _refresh_host_filter_ratios(module: SalienceTransformer, incompatible_keys: object) -> None:
    """Loaded filter-ratio buffers (official checkpoints carry them) become the host copies the forward uses."""
    module.host_filter_ratios = (
        tuple(module.level_filter_ratio.tolist()),
        tuple(module.layer_filter_ratio.tolist()),
    )


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
        for name, ratios in (("level_filter_ratio", level_filter_ratio), ("layer_filter_ratio", layer_filter_ratio)):
            if any(not 0 <= ratio <= 1 for ratio in ratios):
                raise ValueError(f"{name} must lie in [0, 1], got {list(ratios)}; ratios are fractions of tokens kept.")
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.num_queries = num_queries

        self.level_embeds = nn.Parameter(torch.empty(num_levels, embed_dim))
        self.alpha = nn.Parameter(torch.empty(num_levels - 1))
        self.register_buffer("level_filter_ratio", torch.tensor(level_filter_ratio, dtype=torch.float32))
        self.register_buffer("layer_filter_ratio", torch.tensor(layer_filter_ratio, dtype=torch.float32))
        # host copies for the token budgets (no read of the buffers per forward), refreshed when a state dict loads
        self.host_filter_ratios = (tuple(level_filter_ratio), tuple(layer_filter_ratio))
        self.register_load_state_dict_post_hook(_refresh_host_filter_ratios)
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

    def project_memory(
        self,
        memory: Tensor,
        mask_flatten: Tensor,
        spatial_shapes: Tensor | Sequence[tuple[int, int]],
        anchors: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """enc_output + LayerNorm of the masked memory, and the anchor logits.

        Described in docs/model.md#proposals; the same projection is the salience input (#salience-scores).
        ``anchors``: ``FlatLevels.anchors``, computed once for both projections (else computed here).
        """
        if anchors is None:
            masked, anchor_logits = encoder_output_proposals(memory, mask_flatten, spatial_shapes)
        else:
            anchor_logits, keep = anchors
            masked = memory * keep
        return self.enc_output_norm(self.enc_output(masked)), anchor_logits

    def apply_neck(self, memory: Tensor, spatial_shapes: Tensor | Sequence[tuple[int, int]]) -> Tensor:
        """Transformer neck (docs/model.md#transformer-neck) on the memory reshaped per level, flattened again."""
        batch_size = memory.shape[0]
        shapes = levels.host_shapes(spatial_shapes)
        per_level = memory.transpose(1, 2).split([h * w for h, w in shapes], dim=2)  # one transpose for all levels
        maps = [lvl.view(batch_size, self.embed_dim, h, w) for lvl, (h, w) in zip(per_level, shapes)]
        return levels.flatten_levels(self.neck(maps))

    def check_inputs(self, features: list[Tensor], position_embeddings: Tensor | list[Tensor]) -> None:
        """One map per level, and position embeddings as wide as the model (and, flattened, one per token), before
        any work is done."""
        if len(features) != self.num_levels:
            raise ValueError(
                f"SalienceTransformer expects {self.num_levels} feature levels, got {len(features)}; "
                "match the neck's num_outs to transformer.num_levels."
            )
        flat = isinstance(position_embeddings, Tensor)
        channels = position_embeddings.shape[-1] if flat else position_embeddings[0].shape[1]
        if channels != self.embed_dim:
            raise ValueError(
                f"position embeddings have {channels} channels but "
                f"embed_dim={self.embed_dim}; set position_embedding.num_pos_feats to embed_dim // 2."
            )
        num_tokens = sum(feature.shape[-2] * feature.shape[-1] for feature in features)
        if flat and tuple(position_embeddings.shape[:2]) != (features[0].shape[0], num_tokens):
            raise ValueError(
                f"flattened position embeddings must be (B={features[0].shape[0]}, N={num_tokens}, C), got "
                f"{tuple(position_embeddings.shape)}; build them with PositionEmbeddingSine.flat(level_masks)."
            )

    def flatten_inputs(
        self, features: list[Tensor], level_masks: list[Tensor], position_embeddings: Tensor | list[Tensor]
    ) -> FlatLevels:
        """Per-level maps -> one token sequence, with level embeddings added to the positions (one lookup and one
        addition for every level); position embeddings come per level or already flattened (B, N, C)."""
        tokens = levels.flatten_levels(features)
        shapes = tuple((int(f.shape[-2]), int(f.shape[-1])) for f in features)
        level_embeds = self.level_embeds.index_select(0, levels.token_levels(shapes, tokens.device))
        if not isinstance(position_embeddings, Tensor):
            position_embeddings = levels.flatten_levels(position_embeddings)
        positions = position_embeddings + level_embeds
        starts = levels.host_starts(shapes)
        check_level_values(shapes, starts, tokens.shape[1])  # on the host, once, not in every op call
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=tokens.device)
        level_start_index = torch.as_tensor(starts, dtype=torch.long, device=tokens.device)
        valid_ratios = levels.valid_ratios(level_masks, torch.promote_types(tokens.dtype, torch.float32))
        masks = levels.flatten_levels(level_masks)
        anchors = anchor_proposals(masks, shapes, torch.promote_types(tokens.dtype, torch.float32))
        return FlatLevels(tokens, masks, positions, spatial_shapes, level_start_index, valid_ratios, shapes, anchors)

    def encode(
        self, flat: FlatLevels, level_masks: list[Tensor], valid_counts: Sequence[Sequence[int]] | None = None
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Salience maps, token ranking, the filtered encoder and the optional neck: (memory, salience, indices).

        ``valid_counts`` (B, L) host ints (``meta_arch.level_valid_counts``) make the token budgets host work."""
        salience_input = self.project_memory(flat.tokens + flat.positions, flat.masks, flat.shapes, flat.anchors)[0]
        salience = salience_maps(
            salience_input, flat.shapes, levels.host_starts(flat.shapes), self.enc_mask_predictor, self.alpha
        )
        foreground_score, focus_token_nums, layer_indices = select_salient_tokens(
            salience, level_masks, levels.host_starts(flat.shapes), *self.host_filter_ratios, valid_counts=valid_counts
        )
        memory = self.encoder(
            flat.tokens,
            flat.positions,
            flat.spatial_shapes,
            flat.level_start_index,
            flat.valid_ratios,
            flat.masks,
            foreground_score,
            focus_token_nums,
            layer_indices,
            shapes=flat.shapes,
        )
        if self.neck is not None:
            memory = self.apply_neck(memory, flat.shapes)
        return memory, salience, layer_indices

    def propose(
        self, memory: Tensor, flat: FlatLevels, query_order: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Two-stage proposals of every token, then grid NMS and top-k: (query_index, enc_logits, enc_boxes).

        ``query_order`` (B, Q) takes those tokens as the queries instead (``two_stage.select_proposals``)."""
        output_memory, anchor_logits = self.project_memory(memory, flat.masks, flat.shapes, flat.anchors)
        enc_logits_all = self.encoder_class_head(output_memory)
        enc_boxes_all = (self.encoder_bbox_head(output_memory) + anchor_logits).sigmoid()
        return select_proposals(
            enc_logits_all, enc_boxes_all, flat.spatial_shapes, flat.level_start_index, self.num_queries, query_order
        )

    def decoder_queries(
        self, enc_boxes: Tensor, make_denoising: Callable[[int], DenoisingQueries] | None
    ) -> tuple[Tensor, Tensor, Tensor | None, DenoisingQueries | None]:
        """Learned content queries at the detached proposal boxes, denoising queries prepended in training.

        Returns (target, reference_points, self-attention mask or None, denoising queries or None).
        """
        num_queries = enc_boxes.shape[1]
        reference_points = enc_boxes.detach()
        target = self.tgt_embed.weight[:num_queries].expand(enc_boxes.shape[0], -1, -1)
        denoising = make_denoising(num_queries) if make_denoising is not None else None
        if denoising is None:
            return target, reference_points, None, None
        target = torch.cat([denoising.label_query.to(target.dtype), target], 1)
        reference_points = torch.cat([denoising.box_query.sigmoid().to(reference_points.dtype), reference_points], 1)
        return target, reference_points, denoising.attn_mask, denoising

    def forward(
        self,
        features: list[Tensor],
        level_masks: list[Tensor],
        position_embeddings: Tensor | list[Tensor],
        make_denoising: Callable[[int], DenoisingQueries] | None = None,
        *,
        query_order: Tensor | None = None,
        valid_counts: Sequence[Sequence[int]] | None = None,
    ) -> TransformerOutput:
        """features/position_embeddings: per level (B,C,H_l,W_l), the position embeddings also flattened like the
        tokens (B, N, C) (``PositionEmbeddingSine.flat``); level_masks (B,H_l,W_l) True=padding.

        make_denoising(num_queries) builds the denoising queries once the number of matching queries Q' is known
        (it can be smaller than num_queries on small inputs); None disables denoising (evaluation).
        ``query_order`` (B, Q) token indices replace the selected queries (parity checks); ``query_index`` of the
        output is still the model's own choice. ``valid_counts`` (B, L): each image's unpadded tokens per level as
        host ints, so the token budgets read no device value; without them the masks are counted (one read).
        """
        self.check_inputs(features, position_embeddings)
        flat = self.flatten_inputs(features, level_masks, position_embeddings)
        memory, salience, layer_indices = self.encode(flat, level_masks, valid_counts)
        query_index, enc_logits, enc_boxes = self.propose(memory, flat, query_order)
        target, reference_points, attn_mask, denoising = self.decoder_queries(enc_boxes, make_denoising)
        pred_logits, pred_boxes, query_features = self.decoder(
            target,
            reference_points,
            memory,
            flat.spatial_shapes,
            flat.level_start_index,
            flat.valid_ratios,
            key_padding_mask=flat.masks,
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
            spatial_shapes=flat.spatial_shapes,
            denoising=denoising,
        )
