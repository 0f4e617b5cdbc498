"""The tiny synthetic-shapes model with the RoI refinement head: the ablation partner of salience_detr_tiny_synthetic.

Same data, schedule and seed; the head is scaled to the model (128 channels, 50 RoIs) and its loss warm-up (150
iterations) to this short schedule.
"""

from ..models.salience_detr_r50_roi import roi_refine_head
from .salience_detr_tiny_synthetic import dataloader, datasets, lr_multiplier, model, optimizer, train

model.roi_refine = roi_refine_head()
model.roi_refine.num_rois = 50
model.roi_refine.ffn_dim = 512
model.roi_refine.warmup_iters = 150
train.output_dir = "./output/salience_detr_tiny_synthetic_roi"

__all__ = ["dataloader", "datasets", "lr_multiplier", "model", "optimizer", "train"]
