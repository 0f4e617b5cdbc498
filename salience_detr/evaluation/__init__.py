"""Analyses of a COCO evaluation beyond its AP table: confusion matrices and precision-recall curves."""

from .confusion import BACKGROUND, box_iou_xywh, confusion_from_coco, confusion_matrix, match_detections
from .plots import write_evaluation_plots

__all__ = [
    "BACKGROUND",
    "box_iou_xywh",
    "confusion_from_coco",
    "confusion_matrix",
    "match_detections",
    "write_evaluation_plots",
]
