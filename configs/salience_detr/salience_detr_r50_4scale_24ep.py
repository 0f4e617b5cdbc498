"""Salience DETR R50 4-scale, 24 epochs (2x); LR drop after epoch 20 (the official 2x milestone is unpublished)."""

from ..common.schedule import ITERS_24EP
from ..common.schedule import lr_multiplier_24ep as lr_multiplier
from .salience_detr_r50_4scale_12ep import dataloader, model, optimizer, train

train.output_dir = "./output/salience_detr_r50_4scale_24ep"
train.max_iter = ITERS_24EP

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
