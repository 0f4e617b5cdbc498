"""Training losses of Salience DETR: the set criterion and the salience loss.

Described in docs/model.md#set-criterion, #denoising and #salience-loss.

All boxes entering ``HybridSetCriterion`` are normalized cxcywh; losses come back already weighted, under the
official key names (``loss_class``, ``loss_bbox_3``, ``loss_giou_enc``, ``loss_class_dn_0``, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from detectron2.utils import comm
from torch import Tensor, nn
from torch.nn import functional as F

from salience_detr.layers.box_ops import box_cxcywh_to_xyxy, paired_iou_giou

from .matcher import HungarianMatcher

DEFAULT_SET_WEIGHTS = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
DEFAULT_LIMIT_RANGE = ((-1, 64), (64, 128), (128, 256), (256, 99999))

MatchIndices = list[tuple[Tensor, Tensor]]


def average_num_boxes(targets: Sequence[dict], device: torch.device) -> float:
    """Total number of target boxes averaged over processes (all-reduced when distributed), at least 1."""
    num_boxes = float(sum(len(t["labels"]) for t in targets))  # known on the host: no sync on one process
    world_size = comm.get_world_size()
    if world_size == 1:
        return max(num_boxes, 1.0)
    total = torch.as_tensor([num_boxes], device=device)
    dist.all_reduce(total)
    return torch.clamp(total / world_size, min=1).item()


def varifocal_loss(logits: Tensor, target: Tensor, negative_weight: Tensor, gamma: float) -> Tensor:
    """Element-wise IoU-aware BCE (RT-DETR style): target IoU on the matched class, weight (1-α)·p̂^γ on negatives,
    p̂ detached. ``logits``: (B, Q, K); ``target``: ``onehot * iou`` (iou (B, Q), zero for unmatched queries) and
    ``negative_weight``: ``(1 - alpha) * (1 - onehot)``, which a caller scoring several sets computes once for all.
    For a 0/1 ``onehot`` the negative weight is exactly ``1 - alpha`` or 0, so ``p^γ * negative_weight`` is the
    official ``(1 - alpha) * p^γ * (1 - onehot)`` bit for bit."""
    prob = logits.sigmoid().detach()
    weight = prob.pow(gamma) * negative_weight + target
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")


def soft_focal_loss(logits: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise soft-target focal loss: BCE · [(1-α)·p^γ·(1-T) + α·T·(1-p)^γ]; p keeps its gradient."""
    prob = logits.sigmoid()
    weight = (1 - alpha) * prob.pow(gamma) * (1 - target) + alpha * target * (1 - prob).pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight


def set_loss_weights(base: dict[str, float], num_decoder_layers: int) -> dict[str, float]:
    """The weight of every term ``HybridSetCriterion`` returns, from the weight of each base loss.

    Each base name appears for the last decoder layer, the earlier layers (``_{i}``), the encoder proposals
    (``_enc``) and the denoising queries (``_dn``, ``_dn_{i}``), all with the base weight, as the official code does.
    """
    if num_decoder_layers < 1:
        raise ValueError(f"num_decoder_layers must be >= 1 (the decoder's num_layers), got {num_decoder_layers}.")
    earlier = [f"_{i}" for i in range(num_decoder_layers - 1)]
    suffixes = ["", "_enc", "_dn", *earlier, *(f"_dn{suffix}" for suffix in earlier)]
    return {f"{name}{suffix}": weight for name, weight in base.items() for suffix in suffixes}


def denoising_indices(targets: Sequence[dict], num_groups: int, group_size: int, device) -> MatchIndices:
    """Fixed dn assignment: target t of an image goes to query ``g * group_size + t`` of every group g (positives)."""
    indices = []
    for target in targets:
        num_gt = len(target["labels"])
        gt_idx = torch.arange(num_gt, device=device).repeat(num_groups)
        group = torch.arange(num_groups, device=device).repeat_interleave(num_gt)
        indices.append((group * group_size + gt_idx, gt_idx))
    return indices


@dataclasses.dataclass
class OutputSet:
    """One set of predictions to score: (B, Q, K) logits, (B, Q, 4) cxcywh boxes, its assignment and normaliser."""

    logits: Tensor
    boxes: Tensor
    indices: MatchIndices
    num_boxes: float


def matched_pairs(output_sets: Sequence[OutputSet], targets: Sequence[dict], device) -> tuple[Tensor, ...]:
    """(set, image, query, target) of every matched pair of every set, flat int64 tensors, set-major order.

    ``query`` indexes the sets concatenated along the query axis, ``target`` the images' boxes concatenated; the
    offsets and pair counts are host values (query counts are index lengths), so building them reads no tensor.
    """
    query_offsets = np.cumsum([0] + [s.logits.shape[1] for s in output_sets])
    target_offsets = np.cumsum([0] + [len(t["labels"]) for t in targets])
    host = [
        (set_index, image, query_offsets[set_index], target_offsets[image], len(query))
        for set_index, output_set in enumerate(output_sets)
        for image, (query, _) in enumerate(output_set.indices)
    ]
    counts = [row[-1] for row in host]
    ids = torch.as_tensor(np.repeat(np.array([row[:4] for row in host], dtype=np.int64), counts, axis=0), device=device)
    set_index, image, query_offset, target_offset = ids.reshape(-1, 4).unbind(1)
    query = torch.cat([query for s in output_sets for query, _ in s.indices]).to(device) + query_offset
    target = torch.cat([gt for s in output_sets for _, gt in s.indices]).to(device) + target_offset
    return set_index, image, query, target


class HybridSetCriterion(nn.Module):
    """Varifocal classification + L1 + GIoU on every decoder layer, the encoder proposals and the dn groups.

    ``forward(outputs, targets)`` returns the weighted losses; with ``return_indices=True`` it also returns the
    last decoder layer's Hungarian matching (per image ``(query_idx, gt_idx)``), e.g. for a RoI refinement head;
    ``num_boxes`` is the normaliser from ``average_num_boxes`` when the caller shares it (one all-reduce per step).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float] | None = None,
        alpha: float = 0.25,
        gamma: float = 2.0,
        num_decoder_layers: int = 6,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(DEFAULT_SET_WEIGHTS if weight_dict is None else weight_dict)
        missing = set(DEFAULT_SET_WEIGHTS) - set(self.weight_dict)
        if missing:
            raise ValueError(
                f"weight_dict is missing {sorted(missing)}; give weights for {sorted(DEFAULT_SET_WEIGHTS)}"
            )
        self.num_decoder_layers = num_decoder_layers
        self.loss_weights = set_loss_weights(self.weight_dict, num_decoder_layers)
        self.alpha = alpha
        self.gamma = gamma

    def stacked_set_losses(self, output_sets: Sequence[OutputSet], targets: Sequence[dict]) -> dict[str, Tensor]:
        """The unweighted terms of every set, (S,) per term, with a few hundred calls fewer than set by set.

        The sets' boxes are concatenated along the query axis and their matched pairs flattened: the box terms and
        the class targets are computed once over all of them and summed per set; only the class BCE runs per set
        (docs/model.md#set-criterion).
        """
        first = output_sets[0].logits
        offsets = np.cumsum([0] + [s.logits.shape[1] for s in output_sets])
        boxes = torch.cat([s.boxes for s in output_sets], dim=1)  # (B, sum of Q_s, 4)
        set_index, image, query, target = matched_pairs(output_sets, targets, first.device)
        matched_boxes = boxes[image, query]
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(matched_boxes)[target]
        target_labels = torch.cat([t["labels"] for t in targets]).to(first.device)[target]
        iou, giou = paired_iou_giou(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(target_boxes))

        iou_map = first.new_zeros(boxes.shape[:2]).index_put((image, query), iou.detach().to(first.dtype))
        onehot = first.new_zeros(*boxes.shape[:2], first.shape[-1]).index_put(
            (image, query, target_labels), first.new_ones(())
        )
        # the class term runs per set on the set's own tensor: the CPU's vectorised sigmoid rounds the tail of a
        # buffer differently, so on a concatenation the gradients would move by an ulp and the loss curve drift;
        # its targets and negative weights are exact products, computed once for every set
        class_target = onehot * iou_map.unsqueeze(-1)
        negative_weight = (1 - self.alpha) * (1 - onehot)
        class_sums = torch.stack(
            [
                varifocal_loss(s.logits, class_target[:, a:b], negative_weight[:, a:b], self.gamma).sum()
                for s, a, b in zip(output_sets, offsets[:-1], offsets[1:])
            ]
        )
        per_pair = torch.stack([(matched_boxes - target_boxes).abs().sum(-1), 1 - giou])
        box_sums = per_pair.new_zeros(2, len(output_sets)).index_add(1, set_index, per_pair)
        normalisers = torch.as_tensor([s.num_boxes for s in output_sets], dtype=first.dtype, device=first.device)
        return {
            "loss_class": class_sums / normalisers,
            "loss_bbox": box_sums[0] / normalisers,
            "loss_giou": box_sums[1] / normalisers,
        }

    def denoising_sets(
        self, dn_outputs: dict, targets: Sequence[dict], num_boxes: float
    ) -> list[tuple[str, OutputSet]]:
        """``_dn`` (last layer) and ``_dn_{i}`` (earlier layers) sets under the fixed assignment, / (num_boxes·G)."""
        num_groups = int(dn_outputs["denoising_groups"])
        max_gt = int(dn_outputs["max_gt_num_per_image"])
        num_dn = dn_outputs["pred_logits"].shape[1]
        if num_dn != 2 * max_gt * num_groups:
            raise ValueError(
                f"dn_outputs has {num_dn} queries but denoising_groups={num_groups} and max_gt_num_per_image={max_gt} "
                f"imply 2*{max_gt}*{num_groups}={2 * max_gt * num_groups}; pass DenoisingQueries.max_gt_per_image "
                "(n_max, not 2*n_max) and the dn part of the decoder outputs only"
            )
        indices = denoising_indices(targets, num_groups, 2 * max_gt, dn_outputs["pred_logits"].device)
        layers = [("_dn", dn_outputs), *((f"_dn_{i}", aux) for i, aux in enumerate(dn_outputs.get("aux_outputs", [])))]
        normaliser = num_boxes * num_groups
        return [(name, OutputSet(o["pred_logits"], o["pred_boxes"], indices, normaliser)) for name, o in layers]

    def check_targets(self, targets: Sequence[dict], batch_size: int) -> None:
        """One target per image. Label values are not read (that would be a device sync): the meta-arch checks the
        host copies once per batch, and a label >= num_classes given to the criterion alone fails in indexing."""
        if len(targets) != batch_size:
            raise ValueError(f"HybridSetCriterion got {len(targets)} targets for a batch of {batch_size} images")

    def weighted(self, names: Sequence[str], values: Tensor) -> dict[str, Tensor]:
        """``{name: value * weight}`` for the flat ``values`` of ``names``, scaled in one multiplication."""
        unweighted = sorted(set(names) - set(self.loss_weights))
        if unweighted:
            raise ValueError(
                f"losses {unweighted[:4]} have no weight: the outputs have more decoder layers than "
                f"num_decoder_layers={self.num_decoder_layers}; set criterion.num_decoder_layers to the decoder's "
                "num_layers."
            )
        weights = torch.as_tensor([self.loss_weights[name] for name in names], dtype=values.dtype, device=values.device)
        return dict(zip(names, (values * weights).unbind()))

    def forward(
        self, outputs: dict, targets: Sequence[dict], return_indices: bool = False, num_boxes: float | None = None
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], MatchIndices]:
        self.check_targets(targets, outputs["pred_logits"].shape[0])
        if num_boxes is None:
            num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)

        named_sets = [("", outputs), *((f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", [])))]
        if "enc_outputs" in outputs:
            named_sets.append(("_enc", outputs["enc_outputs"]))
        # the matching costs of every set reach the host in one transfer
        all_indices = self.matcher.match_sets([(o["pred_logits"], o["pred_boxes"]) for _, o in named_sets], targets)
        scored = [
            (suffix, OutputSet(o["pred_logits"], o["pred_boxes"], indices, num_boxes))
            for (suffix, o), indices in zip(named_sets, all_indices)
        ]
        if "dn_outputs" in outputs:
            scored += self.denoising_sets(outputs["dn_outputs"], targets, num_boxes)
        terms = self.stacked_set_losses([output_set for _, output_set in scored], targets)
        names = [f"{term}{suffix}" for suffix, _ in scored for term in terms]
        losses = self.weighted(names, torch.stack(list(terms.values()), dim=1).flatten())
        return (losses, all_indices[0]) if return_indices else losses


def salience_targets(
    gt_boxes_xyxy: Sequence[Tensor],
    feature_shapes: Sequence[tuple[int, int]],
    padded_size: tuple[int, int],
    limit_range: Sequence[tuple[float, float]] = DEFAULT_LIMIT_RANGE,
) -> list[Tensor]:
    """Per-level salience targets (B, H_l, W_l) in [0, 1] for absolute-pixel xyxy boxes (docs/model.md#salience-loss).

    A cell centre gets the scale-independent centre-ness ``1 - ½·sqrt(δx² + δy²)`` (1 at a box centre, 0.5 at
    edge midpoints, 1-√2/2 at corners), maximised over every box containing it, but only where at least one
    containing box also matches the level (FCOS range of max(l, t, r, b)); everything else is 0.
    Strides are padded size / feature size per axis.
    """
    flat = flat_salience_targets(gt_boxes_xyxy, feature_shapes, padded_size, limit_range)
    levels = flat.split([h * w for h, w in feature_shapes], dim=1)
    return [level.view(-1, h, w) for level, (h, w) in zip(levels, feature_shapes)]


def cell_centres(
    feature_shapes: Sequence[tuple[int, int]],
    padded_size: tuple[int, int],
    limit_range: Sequence[tuple[float, float]],
) -> np.ndarray:
    """(4, N) float32 host rows x, y, low, high of every cell of every level, flattened level by level.

    Computed on the host from host shapes, in float32 as ``(arange + 0.5) * stride`` on the device would be.
    """
    if len(limit_range) < len(feature_shapes):
        raise ValueError(f"limit_range has {len(limit_range)} ranges for {len(feature_shapes)} feature levels")
    pad_h, pad_w = padded_size
    columns = []
    for (height, width), (low, high) in zip(feature_shapes, limit_range):
        ys = (np.arange(height, dtype=np.float32) + np.float32(0.5)) * np.float32(pad_h / height)
        xs = (np.arange(width, dtype=np.float32) + np.float32(0.5)) * np.float32(pad_w / width)
        ys, xs = np.meshgrid(ys, xs, indexing="ij")
        ranges = np.broadcast_to(np.array([[low], [high]], dtype=np.float32), (2, height * width))
        columns.append(np.concatenate([xs.reshape(1, -1), ys.reshape(1, -1), ranges]))
    return np.concatenate(columns, axis=1) if columns else np.zeros((4, 0), dtype=np.float32)


def flat_salience_targets(
    gt_boxes_xyxy: Sequence[Tensor],
    feature_shapes: Sequence[tuple[int, int]],
    padded_size: tuple[int, int],
    limit_range: Sequence[tuple[float, float]] = DEFAULT_LIMIT_RANGE,
) -> Tensor:
    """(B, N) targets of ``salience_targets``, levels flattened: every image, level and box in one pass.

    The boxes are padded to the batch's largest count (host lengths, no sync); padded slots contain no cell.
    """
    device = gt_boxes_xyxy[0].device if gt_boxes_xyxy else None
    cells = torch.as_tensor(cell_centres(feature_shapes, padded_size, limit_range), device=device)
    counts = [len(boxes) for boxes in gt_boxes_xyxy]
    if max(counts, default=0) == 0:
        return cells.new_zeros(len(counts), cells.shape[1])
    boxes = torch.nn.utils.rnn.pad_sequence([b.float() for b in gt_boxes_xyxy], batch_first=True)[:, None]
    real = torch.as_tensor(np.arange(max(counts))[None] < np.array(counts)[:, None], device=device)[:, None]
    xs, ys, low, high = (row[None, :, None] for row in cells)  # (1, N, 1) against boxes (B, 1, n)
    left, top = xs - boxes[..., 0], ys - boxes[..., 1]
    right, bottom = boxes[..., 2] - xs, boxes[..., 3] - ys
    distances = torch.stack([left, top, right, bottom], dim=-1)  # (B, N, n, 4)
    inside = (distances.amin(dim=-1) > 0) & real
    largest = distances.amax(dim=-1)
    level_match = inside & (largest > low) & (largest <= high)
    delta_x = (left - right) / (left + right)
    delta_y = (top - bottom) / (top + bottom)
    centreness = torch.where(inside, 1 - torch.sqrt(delta_x**2 + delta_y**2) / 2, torch.zeros_like(left))
    return torch.where(level_match.any(dim=-1), centreness.amax(dim=-1), torch.zeros_like(xs[..., 0]))


class SalienceCriterion(nn.Module):
    """Focal loss between the per-level salience logits and the centre-ness targets of ``salience_targets``.

    Summed over every cell of every level (padding included, target 0), divided by the number of positive
    cells in the batch (at least 1, not all-reduced, as the official code), times ``weight``.
    """

    def __init__(
        self,
        limit_range: Sequence[tuple[float, float]] = DEFAULT_LIMIT_RANGE,
        noise_scale: float = 0.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        weight: float = 2.0,
    ):
        super().__init__()
        self.limit_range = tuple(tuple(r) for r in limit_range)
        self.noise_scale = noise_scale
        self.alpha = alpha
        self.gamma = gamma
        self.weight = weight

    def forward(
        self, salience: Sequence[Tensor], gt_boxes_xyxy: Sequence[Tensor], padded_size: tuple[int, int]
    ) -> dict[str, Tensor]:
        if len(gt_boxes_xyxy) != salience[0].shape[0]:
            raise ValueError(
                f"SalienceCriterion got boxes for {len(gt_boxes_xyxy)} images but salience maps for "
                f"{salience[0].shape[0]}"
            )
        shapes = [tuple(s.shape[-2:]) for s in salience]
        boxes = [b.to(salience[0].device) for b in gt_boxes_xyxy]
        targets = flat_salience_targets(boxes, shapes, padded_size, self.limit_range)
        if self.noise_scale > 0:
            targets = (1 - self.noise_scale) * targets + self.noise_scale * torch.rand_like(targets)
        logits = torch.cat([s.flatten(1) for s in salience], dim=1)
        num_pos = torch.clamp((targets > 0.5 * self.noise_scale).sum(), min=1)
        loss = soft_focal_loss(logits, targets.to(logits.dtype), self.alpha, self.gamma).sum() / num_pos
        return {"loss_salience": loss * self.weight}
