"""The matcher's batched cost equals the official formula on the flattened queries bit for bit (torchvision's GIoU,
the focal class cost on all K columns before the targets' are taken), so the assignments cannot move. (Per image,
the CPU's vectorised sigmoid may round a buffer's tail apart: the previous matcher flattened every set too.)"""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from salience_detr.modeling.matcher import HungarianMatcher


def official_cost(matcher: HungarianMatcher, logits, boxes, labels, gt_boxes):
    prob = logits.sigmoid()
    neg = (1 - matcher.alpha) * prob**matcher.gamma * -(1 - prob + 1e-6).log()
    pos = matcher.alpha * (1 - prob) ** matcher.gamma * -(prob + 1e-6).log()
    giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy"))
    return (
        matcher.cost_bbox * torch.cdist(boxes, gt_boxes, p=1)
        + matcher.cost_class * (pos[:, labels] - neg[:, labels])
        + matcher.cost_giou * -giou
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_cost_equals_the_official_cost_of_the_flattened_queries(dtype):
    generator = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0)
    logits = (torch.randn(3, 50, 7, generator=generator) * 4).to(dtype)
    boxes = (torch.rand(3, 50, 4, generator=generator) * 0.5 + 0.1).to(dtype)
    labels = torch.randint(0, 7, (9,), generator=generator)
    gt_boxes = (torch.rand(9, 4, generator=generator) * 0.5 + 0.1).to(dtype)
    expected = official_cost(matcher, logits.flatten(0, 1), boxes.flatten(0, 1), labels, gt_boxes).view(3, 50, 9)
    assert torch.equal(matcher.cost_matrix(logits, boxes, labels, gt_boxes), expected)
