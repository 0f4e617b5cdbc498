"""The RoI head's losses (the counterpart of detectron2's ``FastRCNNOutputLayers.losses``) and their warm-up.

The warm-up reads the training iteration as an argument: the meta-architecture holds it, set by the trainer's
``ModelIterationHook`` before every step, so the model never reaches out for the trainer's state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import box_convert

DEFAULT_ROI_WEIGHTS = {"loss_roi_bbox": 5.0, "loss_roi_giou": 2.0, "loss_roi_iou": 1.0}


def warmup_factor(iteration: int | None, warmup_iters: int) -> float:
    """Linear ramp of the loss weights from 0 to 1 over ``warmup_iters`` iterations (1 when the iteration is
    unknown, e.g. a forward outside the training loop)."""
    if iteration is None or warmup_iters <= 0:
        return 1.0
    return min(1.0, (iteration + 1) / warmup_iters)


def giou_loss_sum(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """torchvision's ``generalized_box_iou_loss(..., reduction="sum")`` with the same arithmetic (its ``eps``), the
    intersection taken with ``where`` instead of boolean-mask indexing: five host syncs fewer, gradients included."""
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    left, top, right, bottom = torch.max(x1, x1g), torch.max(y1, y1g), torch.min(x2, x2g), torch.min(y2, y2g)
    overlaps = (bottom > top) & (right > left)
    intersection = torch.where(overlaps, (right - left) * (bottom - top), torch.zeros_like(x1))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intersection
    iou = intersection / (union + eps)
    hull = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return (1 - (iou - (hull - union) / (hull + eps))).sum()


def roi_box_losses(
    refined: Tensor, target_boxes: Tensor, iou_logits: Tensor | None, num_boxes: float
) -> dict[str, Tensor]:
    """Unweighted L1 / GIoU (/ IoU BCE) of the positive rows' refined boxes (normalized cxcywh).

    Sums over the positives divided by the number of ground-truth boxes, as the other box losses; with
    ``positive_iou`` there are several positives per box, so these terms read several times the decoder's.
    """
    refined_xyxy = box_convert(refined, "cxcywh", "xyxy")
    target_xyxy = box_convert(target_boxes, "cxcywh", "xyxy")
    losses = {
        "loss_roi_bbox": F.l1_loss(refined, target_boxes, reduction="sum") / num_boxes,
        "loss_roi_giou": giou_loss_sum(refined_xyxy, target_xyxy) / num_boxes,
    }
    if iou_logits is not None:
        iou = matched_pairwise_iou(Boxes(refined_xyxy.detach()), Boxes(target_xyxy))
        losses["loss_roi_iou"] = F.binary_cross_entropy_with_logits(iou_logits, iou, reduction="sum") / num_boxes
    return losses


def weighted_losses(losses: Mapping[str, Tensor], weights: Mapping[str, float], factor: float) -> dict[str, Tensor]:
    """Each term times its weight and the warm-up factor."""
    return {name: value * weights[name] * factor for name, value in losses.items()}
