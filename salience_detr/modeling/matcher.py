"""One-to-one Hungarian matching between predictions and ground truth (docs/model.md#matcher)."""

from __future__ import annotations

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
        batch_size, num_queries = pred_logits.shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f"HungarianMatcher got {len(targets)} targets for a batch of {batch_size} predictions")
        device = pred_logits.device
        counts = [len(t["labels"]) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        if sum(counts) == 0:
            return [(empty, empty) for _ in targets]

        gt_labels = torch.cat([t["labels"] for t in targets]).to(device)
        gt_boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=pred_boxes.dtype)
        cost = self.cost_matrix(pred_logits.flatten(0, 1), pred_boxes.flatten(0, 1), gt_labels, gt_boxes)
        cost = cost.view(batch_size, num_queries, -1).float().cpu()
        if not torch.isfinite(cost).all():
            raise ValueError(
                "HungarianMatcher: the matching cost has NaN/inf entries; the predictions (logits or boxes) are not "
                "finite — check the learning rate, AMP settings and the input boxes (they must be valid cxcywh)"
            )

        indices = []
        for image, block in enumerate(cost.split(counts, dim=-1)):
            query_idx, gt_idx = linear_sum_assignment(block[image].numpy())
            indices.append(
                (
                    torch.as_tensor(query_idx, dtype=torch.int64, device=device),
                    torch.as_tensor(gt_idx, dtype=torch.int64, device=device),
                )
            )
        return indices
