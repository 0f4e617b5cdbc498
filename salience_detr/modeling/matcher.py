"""One-to-one Hungarian matching between predictions and ground truth (docs/model.md#matcher)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


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
        """(Q, K) logits, (T,) labels -> (Q, T): focal cost of calling each query the target's class."""
        prob = pred_logits.sigmoid()
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-6).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-6).log()
        return pos[:, gt_labels] - neg[:, gt_labels]

    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor) -> Tensor:
        """(Q, K), (Q, 4) cxcywh, (T,), (T, 4) cxcywh -> (Q, T) weighted matching cost."""
        cost_bbox = torch.cdist(pred_boxes, gt_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy")
        )
        return (
            self.cost_bbox * cost_bbox
            + self.cost_class * self.class_cost(pred_logits, gt_labels)
            + self.cost_giou * cost_giou
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

        The cost matrices of all sets are computed on the device in one go and reach the host in one transfer:
        the step's only data-dependent sync for matching. Returns, per set, what ``forward`` returns.
        """
        for pred_logits, _ in output_sets:
            if len(targets) != pred_logits.shape[0]:
                raise ValueError(
                    f"HungarianMatcher got {len(targets)} targets for a batch of {pred_logits.shape[0]} predictions"
                )
        device = output_sets[0][0].device
        counts = [len(t["labels"]) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        if sum(counts) == 0:
            return [[(empty, empty) for _ in targets] for _ in output_sets]

        dtype = output_sets[0][1].dtype
        gt_labels = torch.cat([t["labels"] for t in targets]).to(device)
        gt_boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=dtype)
        pred_logits = torch.cat([logits.flatten(0, 1) for logits, _ in output_sets])
        pred_boxes = torch.cat([boxes.flatten(0, 1).to(dtype) for _, boxes in output_sets])
        cost = self.cost_matrix(pred_logits, pred_boxes, gt_labels, gt_boxes).float().cpu().numpy()
        if not np.isfinite(cost).all():  # on the host copy: no further sync
            raise ValueError(
                "HungarianMatcher: the matching cost has NaN/inf entries; the predictions (logits or boxes) are not "
                "finite — check the learning rate, AMP settings and the input boxes (they must be valid cxcywh)"
            )
        columns = np.cumsum([0, *counts])
        matches, row = [], 0
        for logits, _ in output_sets:
            batch_size, num_queries = logits.shape[:2]
            block = cost[row : row + batch_size * num_queries].reshape(batch_size, num_queries, -1)
            row += batch_size * num_queries
            matches.append([self._assign(block[i, :, columns[i] : columns[i + 1]], device) for i in range(batch_size)])
        return matches

    @staticmethod
    def _assign(cost: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
        query_idx, gt_idx = linear_sum_assignment(cost)
        return (
            torch.as_tensor(query_idx, dtype=torch.int64, device=device),
            torch.as_tensor(gt_idx, dtype=torch.int64, device=device),
        )
