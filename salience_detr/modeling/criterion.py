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

from .matcher import FlatTargets, HungarianMatcher

DEFAULT_SET_WEIGHTS = {"loss_class": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
TERMS = tuple(DEFAULT_SET_WEIGHTS)  # the order of each set's three values in term_sums
DEFAULT_LIMIT_RANGE = ((-1, 64), (64, 128), (128, 256), (256, 99999))

MatchIndices = list[tuple[Tensor, Tensor]]
HostIndices = list[tuple[np.ndarray, np.ndarray]]


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
    prob = logits.detach().sigmoid()
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


def denoising_indices(counts: Sequence[int], num_groups: int, group_size: int) -> HostIndices:
    """Fixed dn assignment, on the host: target t of an image with ``counts[image]`` boxes goes to query
    ``g * group_size + t`` of every group g (the positives)."""
    indices = []
    for num_gt in counts:
        gt_idx = np.tile(np.arange(num_gt, dtype=np.int64), num_groups)
        group = np.repeat(np.arange(num_groups, dtype=np.int64), num_gt)
        indices.append((group * group_size + gt_idx, gt_idx))
    return indices


@dataclasses.dataclass
class ScoredSets:
    """Every output set of a step, concatenated along the query axis so that each loss term runs once for all of
    them: (B, sum of Q_s, K) logits, (B, sum of Q_s, 4) cxcywh boxes and their corners; per set its query count,
    its host assignment and its normaliser."""

    logits: Tensor
    boxes: Tensor
    corners: Tensor
    sizes: list[int]
    indices: list[HostIndices] = dataclasses.field(default_factory=list)
    normalisers: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, output_sets: Sequence[dict]) -> ScoredSets:
        boxes = torch.cat([o["pred_boxes"] for o in output_sets], dim=1)
        logits = torch.cat([o["pred_logits"] for o in output_sets], dim=1)
        return cls(logits, boxes, box_cxcywh_to_xyxy(boxes), [o["pred_logits"].shape[1] for o in output_sets])

    def matched_pairs(self, counts: Sequence[int]) -> np.ndarray:
        """(4, P) host int64 rows set, image, query, target of every matched pair of every set, set-major order.

        ``query`` indexes the concatenated sets, ``target`` the images' boxes concatenated (``counts`` per image).
        """
        query_offsets = np.cumsum([0, *self.sizes])
        target_offsets = np.cumsum([0, *counts])
        columns = [
            np.stack(np.broadcast_arrays(index, image, query + query_offsets[index], gt + target_offsets[image]))
            for index, set_indices in enumerate(self.indices)
            for image, (query, gt) in enumerate(set_indices)
        ]
        return np.concatenate(columns, axis=1).astype(np.int64, copy=False)

    def query_sets(self) -> np.ndarray:
        """(sum of Q_s,) host index of the set of every query."""
        return np.repeat(np.arange(len(self.sizes)), self.sizes)


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

    def term_sums(self, sets: ScoredSets, gt: FlatTargets) -> Tensor:
        """(3 S,) sums of the class, L1 and GIoU terms of every set, set by set (docs/model.md#set-criterion).

        Each term runs once over the queries or matched pairs of all sets; one ``index_add`` sums them per set
        (the set of every query and pair is a host value).
        """
        pairs = sets.matched_pairs(gt.counts)
        set_index, image, query, target = torch.as_tensor(pairs, device=sets.logits.device)
        labels = gt.labels[target]
        iou, giou = paired_iou_giou(sets.corners[image, query], gt.corners[target])
        entries = (image, query, labels)
        class_target = torch.zeros_like(sets.logits).index_put(entries, iou.detach().to(sets.logits.dtype))
        # (1 - alpha) * (1 - onehot): exactly 1 - alpha off the matched entries, 0 on them
        negative_weight = torch.full_like(sets.logits, 1 - self.alpha).index_put(entries, sets.logits.new_zeros(()))
        per_query = varifocal_loss(sets.logits, class_target, negative_weight, self.gamma).sum((0, 2))
        l1 = (sets.boxes[image, query] - gt.boxes[target]).abs().sum(-1)
        slots = np.concatenate([3 * sets.query_sets(), 3 * pairs[0] + 1, 3 * pairs[0] + 2])
        values = torch.cat([per_query, l1.to(per_query.dtype), (1 - giou).to(per_query.dtype)])
        sums = values.new_zeros(3 * len(sets.sizes))
        return sums.index_add(0, torch.as_tensor(slots, device=values.device), values)

    def denoising_sets(self, dn_outputs: dict) -> tuple[list[tuple[str, dict]], int, int]:
        """``_dn`` (last layer) and ``_dn_{i}`` (earlier layers) output sets, with the group count and ``n_max``."""
        num_groups = int(dn_outputs["denoising_groups"])
        max_gt = int(dn_outputs["max_gt_num_per_image"])
        num_dn = dn_outputs["pred_logits"].shape[1]
        if num_dn != 2 * max_gt * num_groups:
            raise ValueError(
                f"dn_outputs has {num_dn} queries but denoising_groups={num_groups} and max_gt_num_per_image={max_gt} "
                f"imply 2*{max_gt}*{num_groups}={2 * max_gt * num_groups}; pass DenoisingQueries.max_gt_per_image "
                "(n_max, not 2*n_max) and the dn part of the decoder outputs only"
            )
        layers = [("_dn", dn_outputs), *((f"_dn_{i}", aux) for i, aux in enumerate(dn_outputs.get("aux_outputs", [])))]
        return layers, num_groups, max_gt

    def check_targets(self, targets: Sequence[dict], batch_size: int) -> None:
        """One target per image. Label values are not read (that would be a device sync): the meta-arch checks the
        host copies once per batch, and a label >= num_classes given to the criterion alone fails in indexing."""
        if len(targets) != batch_size:
            raise ValueError(f"HybridSetCriterion got {len(targets)} targets for a batch of {batch_size} images")

    def weighted(self, names: Sequence[str], sums: Tensor, normalisers: Sequence[float]) -> dict[str, Tensor]:
        """``{name: sum * weight / normaliser}`` for the flat ``sums`` of ``names`` (one normaliser per set of
        ``len(TERMS)`` names), scaled in one multiplication by host factors."""
        unweighted = sorted(set(names) - set(self.loss_weights))
        if unweighted:
            raise ValueError(
                f"losses {unweighted[:4]} have no weight: the outputs have more decoder layers than "
                f"num_decoder_layers={self.num_decoder_layers}; set criterion.num_decoder_layers to the decoder's "
                "num_layers."
            )
        per_name = np.repeat(normalisers, len(TERMS))
        scale = [self.loss_weights[name] / normaliser for name, normaliser in zip(names, per_name)]
        return dict(zip(names, (sums * torch.tensor(scale, dtype=sums.dtype, device=sums.device)).unbind()))

    def forward(
        self, outputs: dict, targets: Sequence[dict], return_indices: bool = False, num_boxes: float | None = None
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], MatchIndices]:
        self.check_targets(targets, outputs["pred_logits"].shape[0])
        if num_boxes is None:
            num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)

        named_sets = [("", outputs), *((f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", [])))]
        if "enc_outputs" in outputs:
            named_sets.append(("_enc", outputs["enc_outputs"]))
        num_matched = len(named_sets)
        if "dn_outputs" in outputs:
            dn_sets, num_groups, max_gt = self.denoising_sets(outputs["dn_outputs"])
            named_sets += dn_sets
        sets = ScoredSets.of([o for _, o in named_sets])
        gt = FlatTargets.of(targets, sets.boxes.device, sets.boxes.dtype)
        # the matching costs of every set reach the host in one transfer
        sets.indices = self.matcher.match_on_host(sets.logits, sets.boxes, sets.corners, sets.sizes[:num_matched], gt)
        sets.normalisers = [num_boxes] * num_matched
        if len(named_sets) > num_matched:
            dn_indices = denoising_indices(gt.counts, num_groups, 2 * max_gt)
            sets.indices += [dn_indices] * (len(named_sets) - num_matched)
            sets.normalisers += [num_boxes * num_groups] * (len(named_sets) - num_matched)
        names = [f"{term}{suffix}" for suffix, _ in named_sets for term in TERMS]
        losses = self.weighted(names, self.term_sums(sets, gt), sets.normalisers)
        if not return_indices:
            return losses
        device = sets.logits.device
        return losses, [tuple(torch.as_tensor(a, device=device) for a in pair) for pair in sets.indices[0]]


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

    The boxes are padded with zero boxes to the batch's largest count (host lengths, no sync). A zero box contains
    no cell, as every cell centre has x > 0, so its right distance ``0 - x`` is negative.
    """
    device = gt_boxes_xyxy[0].device if gt_boxes_xyxy else None
    cells = cell_centres(feature_shapes, padded_size, limit_range)
    xs, ys, low, high = torch.as_tensor(cells[:, None, :, None], device=device)  # (1, N, 1) against boxes (B, 1, n)
    counts = [len(boxes) for boxes in gt_boxes_xyxy]
    if max(counts, default=0) == 0:
        return xs.new_zeros(len(counts), cells.shape[1])
    x1, y1, x2, y2 = padded_boxes(gt_boxes_xyxy).unbind(-1)
    left, top, right, bottom = xs - x1, ys - y1, x2 - xs, y2 - ys
    distances = torch.stack([left, top, right, bottom], dim=-1)  # (B, N, n, 4)
    inside = distances.amin(dim=-1) > 0
    largest = distances.amax(dim=-1)
    level_match = inside & (largest > low) & (largest <= high)
    delta_x = (left - right) / (left + right)
    delta_y = (top - bottom) / (top + bottom)
    centreness = torch.where(inside, 1 - torch.sqrt(delta_x**2 + delta_y**2) / 2, 0.0)
    return torch.where(level_match.any(dim=-1), centreness.amax(dim=-1), 0.0)


def padded_boxes(gt_boxes_xyxy: Sequence[Tensor]) -> Tensor:
    """(B, 1, n, 4) float32 boxes (a singleton axis for the cells), zero boxes after each image's own up to the
    largest count n: the concatenated boxes copied into host-known rows at once (no per-image copy)."""
    counts = [len(boxes) for boxes in gt_boxes_xyxy]
    longest = max(counts)
    rows = np.concatenate([image * longest + np.arange(count) for image, count in enumerate(counts)])
    flat = torch.cat(list(gt_boxes_xyxy)).float()
    padded = flat.new_zeros(len(counts) * longest, 4)
    return padded.index_copy(0, torch.as_tensor(rows, device=flat.device), flat).view(len(counts), 1, longest, 4)


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
