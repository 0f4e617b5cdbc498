"""``RoIRefineHead``: pools the selected queries' boxes, refines them with attention layers, predicts deltas."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler
from torch import Tensor, nn
from torchvision.ops import box_convert

from salience_detr.layers.box_ops import to_absolute_xyxy, whwh_scale
from salience_detr.layers.mlp import MLP, init_box_head
from salience_detr.layers.position_encoding import get_sine_pos_embed

from ..criterion import MatchIndices, average_num_boxes
from ..transformer import TransformerOutput
from .layers import RoIRefineLayer, level_strides, pool_rows, roi_pooler
from .losses import DEFAULT_ROI_WEIGHTS, roi_box_losses, warmup_factor, weighted_losses
from .sampling import matched_mask, positive_targets, select_queries, selected_rows
from .structures import RoIInputs, RoIRefinement


def check_head_arguments(
    num_rois: int,
    num_layers: int,
    iou_beta: float,
    loss_weights: dict[str, float],
    use_iou_head: bool,
    positive_iou: float | None,
) -> None:
    """Refuse head arguments that cannot work, before any layer is built."""
    if num_rois < 1 or num_layers < 1:
        raise ValueError(f"RoIRefineHead needs num_rois >= 1 and num_layers >= 1, got {num_rois}, {num_layers}.")
    if not 0.0 <= iou_beta <= 1.0:
        raise ValueError(f"iou_beta must lie in [0, 1] (0 disables rescoring), got {iou_beta}.")
    missing = {"loss_roi_bbox", "loss_roi_giou"} - set(loss_weights)
    if use_iou_head:
        missing |= {"loss_roi_iou"} - set(loss_weights)
    if missing:
        raise ValueError(f"loss_weights is missing {sorted(missing)}; give a weight for every RoI loss term.")
    if positive_iou is not None and not 0.0 < positive_iou <= 1.0:
        raise ValueError(f"positive_iou must lie in (0, 1] or be None (matched queries only), got {positive_iou}.")


class RoIRefineHead(nn.Module):
    """Query-conditioned RoI transformer that refines the boxes (and optionally rescores) the best queries."""

    def __init__(
        self,
        *,
        embed_dim: int = 256,
        num_rois: int = 100,
        num_layers: int = 2,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        pooler_resolution: int = 7,
        sampling_ratio: int = 0,
        canonical_box_size: int = 224,
        canonical_level: int = 4,
        box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        use_iou_head: bool = True,
        iou_beta: float = 0.0,
        loss_weights: dict[str, float] | None = None,
        warmup_iters: int = 500,
        detach_features: bool = True,
        positive_iou: float | None = 0.5,
    ):
        super().__init__()
        self.loss_weights = dict(DEFAULT_ROI_WEIGHTS if loss_weights is None else loss_weights)
        check_head_arguments(num_rois, num_layers, iou_beta, self.loss_weights, use_iou_head, positive_iou)
        self.embed_dim = embed_dim
        self.num_rois = num_rois
        self.pooler_resolution = pooler_resolution
        self.sampling_ratio = sampling_ratio
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.iou_beta = iou_beta if use_iou_head else 0.0
        self.positive_iou = positive_iou
        self.warmup_iters = warmup_iters
        self.detach_features = detach_features
        self.box_transform = Box2BoxTransform(weights=tuple(box_weights))
        # drawn from a copy of the CPU generator: adding the head leaves the random stream of the rest of training
        # (denoising noise, sampling) as it is without the head
        with torch.random.fork_rng(devices=[]):
            self.box_embed = MLP(2 * embed_dim, embed_dim, embed_dim, 2)
            self.cell_embed = nn.Parameter(torch.zeros(pooler_resolution**2, embed_dim))
            nn.init.normal_(self.cell_embed, std=0.02)
            self.layers = nn.ModuleList(
                RoIRefineLayer(embed_dim=embed_dim, ffn_dim=ffn_dim, num_heads=num_heads, dropout=dropout)
                for _ in range(num_layers)
            )
            self.delta_head = MLP(embed_dim, embed_dim, 4, 2)
            init_box_head(self.delta_head)
            self.iou_head = MLP(embed_dim, embed_dim, 1, 2) if use_iou_head else None
        self._poolers: dict[tuple[int, ...], ROIPooler] = {}

    def pooler(self, strides: Sequence[int]) -> ROIPooler:
        """Parameter-free detectron2 pooler for these strides, built once per stride set."""
        key = tuple(strides)
        if key not in self._poolers:
            self._poolers[key] = roi_pooler(
                key, self.pooler_resolution, self.sampling_ratio, self.canonical_box_size, self.canonical_level
            )
        return self._poolers[key]

    def crop(self, inputs: RoIInputs, boxes: Tensor, batch_index: Tensor) -> Tensor:
        """(R, S, C) RoI cells of the rows' ``boxes`` (R, 4) on images ``batch_index``, all levels at once."""
        scale = whwh_scale(inputs.image_sizes, boxes)[batch_index]
        features = [(f.detach() if self.detach_features else f).float() for f in inputs.features]
        pooler = self.pooler(level_strides(features, inputs.padded_size))
        pooled = pool_rows(pooler, features, to_absolute_xyxy(boxes, scale).float(), batch_index)
        return pooled.flatten(2).transpose(1, 2)

    def forward(
        self,
        logits: Tensor,
        boxes: Tensor,
        inputs: RoIInputs,
        extra_selected: Tensor | None = None,
        max_extra: int | None = None,
    ) -> RoIRefinement:
        """logits (B,Q,K), boxes (B,Q,4) normalized cxcywh, inputs.query_features (B,Q,C): matching queries only.

        ``max_extra`` bounds the number of ``extra_selected`` queries on the host (the matches), so the rows are
        counted without a host read; None with ``extra_selected`` counts them (one read)."""
        if inputs.query_features.shape[:2] != boxes.shape[:2] or inputs.query_features.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query features {tuple(inputs.query_features.shape)} do not fit boxes {tuple(boxes.shape)} and "
                f"embed_dim={self.embed_dim}; pass the last decoder layer's features of the same matching queries."
            )
        selected = select_queries(logits, self.num_rois, extra_selected)
        num_top = logits.shape[0] * min(self.num_rois, logits.shape[1])
        max_rows = num_top if extra_selected is None else None if max_extra is None else num_top + max_extra
        batch_index, query_index, valid = selected_rows(selected, max_rows)
        input_boxes = boxes.detach()[batch_index, query_index]
        cells = self.crop(inputs, input_boxes, batch_index).to(input_boxes.dtype)

        pos = get_sine_pos_embed(input_boxes, num_pos_feats=self.embed_dim // 2)
        query = (inputs.query_features.detach()[batch_index, query_index] + self.box_embed(pos)).unsqueeze(1)
        for layer in self.layers:
            query = layer(query, cells, self.cell_embed)
        query = query.squeeze(1)

        deltas = self.delta_head(query)
        refined_xyxy = self.box_transform.apply_deltas(deltas, box_convert(input_boxes, "cxcywh", "xyxy"))
        refined = box_convert(refined_xyxy.to(boxes.dtype), "xyxy", "cxcywh")
        index = (batch_index, query_index)
        new_boxes = boxes.detach().index_put(index, torch.where(valid[:, None], refined, input_boxes))
        iou_logits = self.iou_head(query).squeeze(-1) if self.iou_head is not None else None
        new_logits = self.rescore(logits, index, valid, iou_logits)
        return RoIRefinement(new_boxes, new_logits, batch_index, query_index, input_boxes, refined, iou_logits, valid)

    def rescore(self, logits: Tensor, index: tuple[Tensor, Tensor], valid: Tensor, iou_logits: Tensor | None) -> Tensor:
        """With ``iou_beta`` > 0 the valid rows' class scores become p^(1-beta) * IoU^beta; else ``logits``."""
        if iou_logits is None or self.iou_beta <= 0:
            return logits
        row_logits = logits[index]
        rescored = row_logits.sigmoid().pow(1 - self.iou_beta) * iou_logits.sigmoid().unsqueeze(-1).pow(self.iou_beta)
        return logits.index_put(index, torch.where(valid[:, None], torch.logit(rescored, eps=1e-6), row_logits))

    def losses(
        self,
        refinement: RoIRefinement,
        targets: Sequence[dict[str, Tensor]],
        indices: MatchIndices,
        iteration: int | None = None,
        num_boxes: float | None = None,
        check_matched: bool = True,
    ) -> dict[str, Tensor]:
        """Weighted RoI losses of the positive rows, scaled by the warm-up at ``iteration`` (None: no warm-up).

        ``num_boxes``: the criterion's normaliser (None: averaged here, one more all-reduce when distributed);
        ``check_matched`` refuses a matched query that was not refined (one host read)."""
        rows, target_boxes, weights = positive_targets(refinement, targets, indices, self.positive_iou, check_matched)
        iou_logits = None if refinement.iou_logits is None else refinement.iou_logits[rows]
        if num_boxes is None:
            num_boxes = average_num_boxes(targets, refinement.refined_boxes.device)
        losses = roi_box_losses(refinement.refined_boxes[rows], target_boxes, weights, iou_logits, num_boxes)
        return weighted_losses(losses, self.loss_weights, warmup_factor(iteration, self.warmup_iters))

    def training_losses(
        self,
        output: TransformerOutput,
        inputs: RoIInputs,
        targets: Sequence[dict[str, Tensor]],
        indices: MatchIndices,
        iteration: int | None = None,
        num_boxes: float | None = None,
    ) -> dict[str, Tensor]:
        """Refine the last layer's matching queries (denoising excluded) plus the matched ones; their losses at the
        training ``iteration`` (what the warm-up reads; None: no warm-up), over the criterion's ``num_boxes``.

        No host read: the matches bound the extra rows, and they are refined by construction (no check)."""
        num_denoising = 0 if output.denoising is None else output.denoising.label_query.shape[1]
        logits, boxes = output.pred_logits[-1, :, num_denoising:], output.pred_boxes[-1, :, num_denoising:]
        matching_features = inputs.query_features[:, num_denoising:]
        matching_inputs = dataclasses.replace(inputs, query_features=matching_features)
        matched = matched_mask(indices, tuple(boxes.shape[:2]), boxes.device)
        refinement = self(logits, boxes, matching_inputs, matched, max_extra=sum(len(query) for query, _ in indices))
        return self.losses(refinement, targets, indices, iteration, num_boxes, check_matched=False)

    def refine_output(self, output: TransformerOutput, inputs: RoIInputs) -> TransformerOutput:
        """Inference: the same output with the last layer's selected boxes (and scores) replaced by refined ones."""
        if output.denoising is not None:
            raise ValueError("refine_output is for inference; training outputs carry denoising queries.")
        refinement = self(output.pred_logits[-1], output.pred_boxes[-1], inputs)
        return dataclasses.replace(
            output,
            pred_logits=torch.cat([output.pred_logits[:-1], refinement.logits[None]]),
            pred_boxes=torch.cat([output.pred_boxes[:-1], refinement.boxes[None]]),
        )
