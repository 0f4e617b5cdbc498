"""Salience DETR R50 4-scale, 12 epochs (1x) on COCO 2017: official recipe, total batch 16.

Recipe: docs/model.md#training-recipe.
"""

from ..common.data.coco_detr import dataloader
from ..common.optim import AdamW as optimizer
from ..common.schedule import ITERS_12EP, ITERS_PER_EPOCH
from ..common.schedule import lr_multiplier_12ep as lr_multiplier
from ..common.train import train
from ..models.salience_detr_r50 import model

# detectron2's torchvision R-50 (ImageNet V1 weights, RGB input, stride in the 3x3 conv); the official runs used
# torchvision's IMAGENET1K_V2 weights, which detectron2's convert-torchvision-to-d2.py turns into a .pkl the same way.
train.init_checkpoint = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
train.output_dir = "./output/salience_detr_r50_4scale_12ep"
train.max_iter = ITERS_12EP
train.eval_period = ITERS_PER_EPOCH
train.checkpointer.period = ITERS_PER_EPOCH

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
