"""The RoI head's losses (the counterpart of detectron2's ``FastRCNNOutputLayers.losses``) and their warm-up.

The warm-up reads the training iteration as an argument: the meta-architecture holds it, set by the trainer's
``ModelIterationHook`` before every step, so the model never reaches out for the trainer's state.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import box_convert

from salience_detr.layers.box_ops import paired_iou_giou

DEFAULT_ROI_WEIGHTS = {"loss_roi_bbox": 5.0, "loss_roi_giou": 2.0, "loss_roi_iou": 1.0}


def warmup_factor(iteration: int | None, warmup_iters: int) -> float:
    """Linear ramp of the loss weights from 0 to 1 over ``warmup_iters`` iterations (1 when the iteration is
    unknown, e.g. a forward outside the training loop)."""
    if iteration is None or warmup_iters <= 0:
        return 1.0
    return min(1.0, (iteration + 1) / warmup_iters)


def roi_box_losses(
    refined: Tensor, target_boxes: Tensor, weights: Tensor, iou_logits: Tensor | None, num_boxes: float
) -> dict[str, Tensor]:
    """Unweighted L1 / GIoU (/ IoU BCE) of the refined boxes (normalized cxcywh), each row counted ``weights`` times
    (0 or 1: a fixed number of rows, positives among them, see ``positive_targets``).

    Sums over the positives divided by the number of ground-truth boxes, as the other box losses; with
    ``positive_iou`` there are several positives per box, so these terms read several times the decoder's. One
    IoU computation gives the GIoU loss and the IoU head's target.
    """
    iou, giou = paired_iou_giou(box_convert(refined, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
    losses = {
        "loss_roi_bbox": ((refined - target_boxes).abs().sum(-1) * weights).sum() / num_boxes,
        "loss_roi_giou": ((1 - giou) * weights).sum() / num_boxes,
    }
    if iou_logits is not None:
        bce = F.binary_cross_entropy_with_logits(iou_logits, iou.detach(), weight=weights, reduction="sum")
        losses["loss_roi_iou"] = bce / num_boxes
    return losses


def weighted_losses(losses: Mapping[str, Tensor], weights: Mapping[str, float], factor: float) -> dict[str, Tensor]:
    """Each term times its weight and the warm-up factor."""
    return {name: value * weights[name] * factor for name, value in losses.items()}
