"""RoI refinement head: the best queries look again at the image through RoIAlign crops at their boxes.

After the last decoder layer, the top-K queries (plus, in training, every query the matcher assigned to a ground
truth) crop a 7x7 RoIAlignV2 window from the neck level that fits their box size (FPN rule). A few
query-conditioned cross-attention layers read the 49 cells and predict R-CNN box deltas relative to the detached
decoder box, and optionally the IoU of the refined box for rescoring. The design is in docs/roi_refine.md.

Its box losses train on the matched queries and, with ``positive_iou`` (default 0.5), on every other refined query
whose box overlaps a ground truth that much, as R-CNN heads do: 8.6 times the examples on the trained tiny model, and
drawn from the queries it refines at inference (benchmarks/roi_refine.md measures the gain).

By default the crops are detached as well, so the head's loss trains the head alone; with the head clipped as its
own group (``train.clip_grad.separate``) the base model trains bit for bit as without the head. The head is then a
pure add-on, and switching it off at inference is the without-head arm of the ablation on the very same weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss

from salience_detr.layers.box_ops import to_absolute_xyxy, whwh_scale
from salience_detr.layers.mlp import MLP, init_box_head
from salience_detr.layers.position_encoding import get_sine_pos_embed
from salience_detr.layers.post_norm import PostNormLayer

from .criterion import MatchIndices, average_num_boxes
from .transformer import TransformerOutput

DEFAULT_ROI_WEIGHTS = {"loss_roi_bbox": 5.0, "loss_roi_giou": 2.0, "loss_roi_iou": 1.0}


@dataclasses.dataclass
class RoIInputs:
    """What the head reads besides the decoder outputs: features per level (B,C,H_l,W_l) of the padded batch."""

    query_features: Tensor
    features: list[Tensor]
    image_sizes: list[tuple[int, int]]
    padded_size: tuple[int, int]


@dataclasses.dataclass
class RoIRefinement:
    """Refined predictions of the selected queries, flattened over the batch (R rows, image-major order).

    ``boxes``/``logits`` are the full (B, Q, ...) last-layer predictions with the selected rows replaced.
    """

    boxes: Tensor
    logits: Tensor
    batch_index: Tensor
    query_index: Tensor
    input_boxes: Tensor
    refined_boxes: Tensor
    iou_logits: Tensor | None


def current_iteration() -> int | None:
    """detectron2's training iteration when an EventStorage is active, else None (no warm-up then)."""
    try:
        return get_event_storage().iter
    except AssertionError:
        return None


def warmup_factor(iteration: int | None, warmup_iters: int) -> float:
    """Linear ramp of the loss weights from 0 to 1 over ``warmup_iters`` iterations."""
    if iteration is None or warmup_iters <= 0:
        return 1.0
    return min(1.0, (iteration + 1) / warmup_iters)


def select_queries(logits: Tensor, num_rois: int, extra: Tensor | None = None) -> Tensor:
    """(B, Q) bool: the top-``num_rois`` queries by maximum sigmoid class score, OR ``extra`` (e.g. matched ones)."""
    scores = logits.detach().sigmoid().amax(-1)
    top = scores.topk(min(num_rois, scores.shape[1]), dim=1).indices
    selected = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top, torch.ones_like(top, dtype=torch.bool))
    return selected if extra is None else selected | extra


def matched_mask(indices: MatchIndices, shape: tuple[int, int], device: torch.device) -> Tensor:
    """(B, Q) bool marking the queries the Hungarian matcher assigned to a ground-truth box."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    for image, (query, _) in enumerate(indices):
        mask[image, query.to(device)] = True
    return mask


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
        if num_rois < 1 or num_layers < 1:
            raise ValueError(f"RoIRefineHead needs num_rois >= 1 and num_layers >= 1, got {num_rois}, {num_layers}.")
        if not 0.0 <= iou_beta <= 1.0:
            raise ValueError(f"iou_beta must lie in [0, 1] (0 disables rescoring), got {iou_beta}.")
        self.embed_dim = embed_dim
        self.num_rois = num_rois
        self.pooler_resolution = pooler_resolution
        self.sampling_ratio = sampling_ratio
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        self.iou_beta = iou_beta if use_iou_head else 0.0
        self.loss_weights = dict(DEFAULT_ROI_WEIGHTS if loss_weights is None else loss_weights)
        missing = {"loss_roi_bbox", "loss_roi_giou"} - set(self.loss_weights)
        if use_iou_head:
            missing |= {"loss_roi_iou"} - set(self.loss_weights)
        if missing:
            raise ValueError(f"loss_weights is missing {sorted(missing)}; give a weight for every RoI loss term.")
        if positive_iou is not None and not 0.0 < positive_iou <= 1.0:
            raise ValueError(f"positive_iou must lie in (0, 1] or be None (matched queries only), got {positive_iou}.")
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
            self._poolers[key] = ROIPooler(
                output_size=self.pooler_resolution,
                scales=tuple(1.0 / s for s in strides),
                sampling_ratio=self.sampling_ratio,
                pooler_type="ROIAlignV2",
                canonical_box_size=self.canonical_box_size,
                canonical_level=self.canonical_level,
            )
        return self._poolers[key]

    def crop(self, inputs: RoIInputs, boxes: Tensor, selected: Tensor) -> Tensor:
        """(R, S, C) RoI cells of the selected boxes, all images and levels in one pooler call."""
        batch_index = selected.nonzero(as_tuple=True)[0]
        rois = to_absolute_xyxy(boxes, whwh_scale(inputs.image_sizes, boxes)[batch_index]).float()
        per_image = rois.split(selected.sum(1).tolist())
        features = [(f.detach() if self.detach_features else f).float() for f in inputs.features]
        pooled = self.pooler(level_strides(features, inputs.padded_size))(features, [Boxes(b) for b in per_image])
        return pooled.flatten(2).transpose(1, 2)

    def forward(
        self, logits: Tensor, boxes: Tensor, inputs: RoIInputs, extra_selected: Tensor | None = None
    ) -> RoIRefinement:
        """logits (B,Q,K), boxes (B,Q,4) normalized cxcywh, inputs.query_features (B,Q,C): matching queries only."""
        if inputs.query_features.shape[:2] != boxes.shape[:2] or inputs.query_features.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query features {tuple(inputs.query_features.shape)} do not fit boxes {tuple(boxes.shape)} and "
                f"embed_dim={self.embed_dim}; pass the last decoder layer's features of the same matching queries."
            )
        selected = select_queries(logits, self.num_rois, extra_selected)
        batch_index, query_index = selected.nonzero(as_tuple=True)
        input_boxes = boxes.detach()[batch_index, query_index]
        cells = self.crop(inputs, input_boxes, selected).to(input_boxes.dtype)

        pos = get_sine_pos_embed(input_boxes, num_pos_feats=self.embed_dim // 2)
        query = (inputs.query_features.detach()[batch_index, query_index] + self.box_embed(pos)).unsqueeze(1)
        for layer in self.layers:
            query = layer(query, cells, self.cell_embed)
        query = query.squeeze(1)

        deltas = self.delta_head(query)
        refined_xyxy = self.box_transform.apply_deltas(deltas, box_convert(input_boxes, "cxcywh", "xyxy"))
        refined = box_convert(refined_xyxy.to(boxes.dtype), "xyxy", "cxcywh")
        new_boxes = boxes.detach().index_put((batch_index, query_index), refined)

        iou_logits = self.iou_head(query).squeeze(-1) if self.iou_head is not None else None
        new_logits = logits
        if iou_logits is not None and self.iou_beta > 0:
            prob = logits[batch_index, query_index].sigmoid()
            rescored = prob.pow(1 - self.iou_beta) * iou_logits.sigmoid().unsqueeze(-1).pow(self.iou_beta)
            new_logits = logits.index_put((batch_index, query_index), torch.logit(rescored, eps=1e-6))
        return RoIRefinement(new_boxes, new_logits, batch_index, query_index, input_boxes, refined, iou_logits)

    def targets_of_rows(
        self, refinement: RoIRefinement, targets: Sequence[dict[str, Tensor]], indices: MatchIndices
    ) -> tuple[Tensor, Tensor]:
        """(rows, target boxes) the box losses train on: every matched query with its ground truth, and with
        ``positive_iou`` also every other refined query whose input box overlaps a ground truth by that much (its
        best-overlapping one), as R-CNN heads train on all proposals near an object."""
        num_queries = refinement.boxes.shape[1]
        device = refinement.refined_boxes.device
        row_of = torch.full((len(indices), num_queries), -1, dtype=torch.long, device=device)
        num_rows = len(refinement.batch_index)
        row_of[refinement.batch_index, refinement.query_index] = torch.arange(num_rows, device=device)
        batch = torch.cat([torch.full_like(query, i) for i, (query, _) in enumerate(indices)]).to(device)
        rows = row_of[batch, torch.cat([query for query, _ in indices]).to(device)]
        if (rows < 0).any():
            raise ValueError("a matched query was not refined; pass the matched queries as extra_selected in forward.")
        target_boxes = torch.cat([t["boxes"][gt] for t, (_, gt) in zip(targets, indices)]).to(refinement.refined_boxes)
        if self.positive_iou is None:
            return rows, target_boxes
        unmatched = torch.ones(num_rows, dtype=torch.bool, device=device)
        unmatched[rows] = False
        positive_rows, positive_boxes = [rows], [target_boxes]
        for image, target in enumerate(targets):
            if not len(target["boxes"]):
                continue
            candidates = (unmatched & (refinement.batch_index == image)).nonzero(as_tuple=True)[0]
            gt_boxes = target["boxes"].to(target_boxes)
            candidate_xyxy = box_convert(refinement.input_boxes[candidates], "cxcywh", "xyxy")
            overlap = box_iou(candidate_xyxy, box_convert(gt_boxes, "cxcywh", "xyxy"))
            best_iou, best_gt = overlap.max(1)
            positive = best_iou >= self.positive_iou
            positive_rows.append(candidates[positive])
            positive_boxes.append(gt_boxes[best_gt[positive]])
        return torch.cat(positive_rows), torch.cat(positive_boxes)

    def losses(
        self,
        refinement: RoIRefinement,
        targets: Sequence[dict[str, Tensor]],
        indices: MatchIndices,
        iteration: int | None = None,
    ) -> dict[str, Tensor]:
        """Weighted L1 / GIoU (/ IoU BCE) of the positive queries' refined boxes, warmed up.

        Sums over the positives divided by the number of ground-truth boxes, as the other box losses; with
        ``positive_iou`` there are several positives per box, so these terms read several times the decoder's.
        """
        rows, target_boxes = self.targets_of_rows(refinement, targets, indices)
        refined = refinement.refined_boxes[rows]
        refined_xyxy = box_convert(refined, "cxcywh", "xyxy")
        target_xyxy = box_convert(target_boxes, "cxcywh", "xyxy")
        num_boxes = average_num_boxes(targets, refinement.refined_boxes.device)
        losses = {
            "loss_roi_bbox": F.l1_loss(refined, target_boxes, reduction="sum") / num_boxes,
            "loss_roi_giou": generalized_box_iou_loss(refined_xyxy, target_xyxy, reduction="sum") / num_boxes,
        }
        if refinement.iou_logits is not None:
            iou = matched_pairwise_iou(Boxes(refined_xyxy.detach()), Boxes(target_xyxy))
            bce = F.binary_cross_entropy_with_logits(refinement.iou_logits[rows], iou, reduction="sum")
            losses["loss_roi_iou"] = bce / num_boxes
        factor = warmup_factor(iteration, self.warmup_iters)
        return {name: value * self.loss_weights[name] * factor for name, value in losses.items()}

    def training_losses(
        self,
        output: TransformerOutput,
        inputs: RoIInputs,
        targets: Sequence[dict[str, Tensor]],
        indices: MatchIndices,
    ) -> dict[str, Tensor]:
        """Refine the last layer's matching queries (denoising excluded) plus the matched ones; their losses."""
        num_denoising = 0 if output.denoising is None else output.denoising.label_query.shape[1]
        logits, boxes = output.pred_logits[-1, :, num_denoising:], output.pred_boxes[-1, :, num_denoising:]
        matching_features = inputs.query_features[:, num_denoising:]
        matching_inputs = dataclasses.replace(inputs, query_features=matching_features)
        matched = matched_mask(indices, tuple(boxes.shape[:2]), boxes.device)
        refinement = self(logits, boxes, matching_inputs, matched)
        return self.losses(refinement, targets, indices, current_iteration())

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
