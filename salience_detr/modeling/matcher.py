"""One-to-one Hungarian matching between predictions and ground truth (docs/model.md#matcher)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from salience_detr.layers.box_ops import box_cxcywh_to_xyxy, paired_iou_giou


@dataclasses.dataclass(frozen=True)
class FlatTargets:
    """Every image's targets concatenated once per step, shared by the matcher and the set losses: (T,) labels,
    (T, 4) cxcywh boxes, the same boxes as xyxy corners, and the host count of boxes per image."""

    labels: Tensor
    boxes: Tensor
    corners: Tensor
    counts: list[int]

    @classmethod
    def of(cls, targets: Sequence[dict], device: torch.device, dtype: torch.dtype) -> FlatTargets:
        labels = torch.cat([t["labels"] for t in targets]).to(device)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=dtype)
        return cls(labels, boxes, box_cxcywh_to_xyxy(boxes), [len(t["labels"]) for t in targets])


class HungarianMatcher(nn.Module):
    """Match each ground-truth box to one query by minimising a focal-class + L1 + GIoU cost.

    Costs for the whole batch are computed at once against the concatenated targets; the assignment is then
    solved per image on that image's block (scipy ``linear_sum_assignment``).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher needs at least one non-zero cost weight")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    def class_cost(self, pred_logits: Tensor, gt_labels: Tensor) -> Tensor:
        """(..., Q, K) logits, (T,) labels -> (..., Q, T): focal cost of calling each query the target's class.

        The targets' columns are taken before the focal terms: the same numbers, on T instead of K columns. The
        minus of ``-log`` rides on the constant factor (a product's sign is exact), one call fewer per term."""
        prob = pred_logits.sigmoid()[..., gt_labels]
        neg = -(1 - self.alpha) * prob**self.gamma * (1 - prob + 1e-6).log()
        pos = -self.alpha * (1 - prob) ** self.gamma * (prob + 1e-6).log()
        return pos - neg

    def cost_matrix(
        self,
        pred_logits: Tensor,
        pred_boxes: Tensor,
        gt_labels: Tensor,
        gt_boxes: Tensor,
        pred_xyxy: Tensor | None = None,
        gt_xyxy: Tensor | None = None,
    ) -> Tensor:
        """(..., Q, K), (..., Q, 4) cxcywh, (T,), (T, 4) cxcywh -> (..., Q, T) weighted matching cost.

        ``pred_xyxy`` / ``gt_xyxy`` are the same boxes as corners when the caller has them already.
        """
        pred_xyxy = box_cxcywh_to_xyxy(pred_boxes) if pred_xyxy is None else pred_xyxy
        gt_xyxy = box_cxcywh_to_xyxy(gt_boxes) if gt_xyxy is None else gt_xyxy
        cost_bbox = torch.cdist(pred_boxes, gt_boxes, p=1)
        giou = paired_iou_giou(pred_xyxy[..., None, :], gt_xyxy)[1]
        return (
            self.cost_bbox * cost_bbox
            + self.cost_class * self.class_cost(pred_logits, gt_labels)
            + -self.cost_giou * giou  # the weight of the cost -GIoU, the same product
        )

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Return per image ``(query_idx, gt_idx)`` int64 tensors (sorted by query), empty for images without boxes."""
        return self.match_sets([(pred_logits, pred_boxes)], targets)[0]

    @torch.no_grad()
    def match_sets(
        self, output_sets: Sequence[tuple[Tensor, Tensor]], targets: list[dict]
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """Match several ``(pred_logits, pred_boxes)`` sets (decoder layers, encoder proposals) to the same targets.

        Returns, per set, what ``forward`` returns (``match_on_host`` does the work, in one transfer).
        """
        for pred_logits, _ in output_sets:
            if len(targets) != pred_logits.shape[0]:
                raise ValueError(
                    f"HungarianMatcher got {len(targets)} targets for a batch of {pred_logits.shape[0]} predictions"
                )
        device, dtype = output_sets[0][0].device, output_sets[0][1].dtype
        logits = torch.cat([logits for logits, _ in output_sets], dim=1)
        boxes = torch.cat([boxes.to(dtype) for _, boxes in output_sets], dim=1)
        sizes = [logits.shape[1] for logits, _ in output_sets]
        matches = self.match_on_host(logits, boxes, None, sizes, FlatTargets.of(targets, device, dtype))
        return [[tuple(torch.as_tensor(a, device=device) for a in pair) for pair in pairs] for pairs in matches]

    @torch.no_grad()
    def match_on_host(
        self,
        logits: Tensor,
        boxes: Tensor,
        corners: Tensor | None,
        set_sizes: Sequence[int],
        gt: FlatTargets,
    ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Per set and image the host ``(query_idx, gt_idx)`` int64 arrays, for sets concatenated along the query
        axis: (B, Q, K) logits, (B, Q, 4) cxcywh boxes (and their xyxy ``corners`` when the caller has them), set
        s being the next ``set_sizes[s]`` queries; queries after the last set are not matched.

        The cost matrices of all sets are computed on the device in one go and reach the host in one transfer:
        the step's only data-dependent sync for matching.
        """
        batch_size, total = logits.shape[0], sum(set_sizes)
        empty = np.zeros(0, dtype=np.int64)
        if sum(gt.counts) == 0:
            return [[(empty, empty)] * batch_size for _ in set_sizes]
        corners = None if corners is None else corners[:, :total]
        cost = self.cost_matrix(logits[:, :total], boxes[:, :total], gt.labels, gt.boxes, corners, gt.corners)
        cost = cost.float().cpu().numpy()
        if not np.isfinite(cost).all():  # on the host copy: no further sync
            raise ValueError(
                "HungarianMatcher: the matching cost has NaN/inf entries; the predictions (logits or boxes) are not "
                "finite — check the learning rate, AMP settings and the input boxes (they must be valid cxcywh)"
            )
        columns, starts = np.cumsum([0, *gt.counts]), np.cumsum([0, *set_sizes])
        return [
            [self._assign(cost[image, start:end, columns[image] : columns[image + 1]]) for image in range(batch_size)]
            for start, end in zip(starts[:-1], starts[1:])
        ]

    @staticmethod
    def _assign(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        query_idx, gt_idx = linear_sum_assignment(cost)
        return np.asarray(query_idx, dtype=np.int64), np.asarray(gt_idx, dtype=np.int64)
