"""Box helpers shared by the heads, the losses and post-processing (torch only, so export hosts import them).

Boxes are ``cxcywh`` normalised by each unpadded image size inside the model and absolute ``xyxy`` pixels at its
borders (targets in, ``Instances`` out); the conversions use the same arithmetic as torchvision's ``box_convert``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """Logit of ``x`` clamped to [0, 1]; ``eps`` bounds the result to about ±6.9 as in the official code."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre, width, height -> corners; both coordinates per call, the same numbers as one at a time."""
    centre, half = boxes[..., :2], 0.5 * boxes[..., 2:]
    return torch.cat((centre - half, centre + half), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) corners -> centre, width, height; both coordinates per call, the same numbers as one at a time."""
    low, high = boxes[..., :2], boxes[..., 2:]
    return torch.cat(((low + high) / 2, high - low), dim=-1)


def whwh_scale(image_sizes: Sequence[tuple[int, int]], like: Tensor) -> Tensor:
    """(N, 4) ``[w, h, w, h]`` per ``(height, width)`` image size, in ``like``'s dtype and device.

    Stacked rather than converted at once: under tracing (FLOP counting, export) the sizes are 0-d tensors.
    """
    if len(image_sizes) == 0:
        raise ValueError("whwh_scale needs at least one (height, width) image size, got none.")
    sizes = torch.stack([torch.stack([torch.as_tensor(h), torch.as_tensor(w)]) for h, w in image_sizes]).to(like)
    return sizes[:, [1, 0, 1, 0]]


def to_absolute_xyxy(boxes: Tensor, scale: Tensor) -> Tensor:
    """Normalised cxcywh -> absolute xyxy pixels; ``scale`` is ``[w, h, w, h]`` broadcastable to ``boxes``."""
    return box_cxcywh_to_xyxy(boxes) * scale


def _area(sides: Tensor) -> Tensor:
    """(..., 2) width and height -> (...,) their product (``unbind``: one call, one stack in backward)."""
    width, height = sides.unbind(-1)
    return width * height


def paired_iou_giou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and generalized IoU of each xyxy box of ``boxes1`` with the one of ``boxes2`` at its place (..., 4),
    broadcast like any elementwise op (``boxes1[:, None]`` against ``boxes2`` gives the pairwise matrices).

    The diagonals of torchvision's ``box_iou`` / ``generalized_box_iou`` with the same arithmetic, without their
    N x N matrices: the set losses score thousands of matched pairs at once. Each corner pair is sliced once.
    """
    low1, high1 = boxes1[..., :2], boxes1[..., 2:]
    low2, high2 = boxes2[..., :2], boxes2[..., 2:]
    area1, area2 = _area(high1 - low1), _area(high2 - low2)
    inter = _area((torch.min(high1, high2) - torch.max(low1, low2)).clamp(min=0))
    union = area1 + area2 - inter
    iou = inter / union
    enclosing = _area((torch.max(high1, high2) - torch.min(low1, low2)).clamp(min=0))
    return iou, iou - (enclosing - union) / enclosing
