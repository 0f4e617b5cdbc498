"""Salience DETR R50 4-scale, 12 epochs, with the RoI refinement head.

The recipe of salience_detr_r50_4scale_12ep.py.
"""

from ..models.salience_detr_r50_roi import roi_refine_head
from .salience_detr_r50_4scale_12ep import dataloader, lr_multiplier, model, optimizer, train

model.roi_refine = roi_refine_head()
train.output_dir = "./output/salience_detr_r50_roi_4scale_12ep"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
