"""Salience DETR R50 "5-scale" (C2-C5, strides 4-32), 12 epochs; no official checkpoint exists for it."""

from ..models.salience_detr_r50_5scale import model
from .salience_detr_r50_4scale_12ep import dataloader, lr_multiplier, optimizer, train

train.output_dir = "./output/salience_detr_r50_5scale_12ep"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
