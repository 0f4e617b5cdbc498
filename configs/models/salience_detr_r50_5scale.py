"""Salience DETR R50 "5-scale" (official salience_detr_resnet50_5scale): C2-C5 (strides 4-32), still 4 levels.

As in the official config, the ChannelMapper gets four inputs and no extra level, and only the background
embedding grows (stride-4 maps exceed 200 cells); filter ratios and salience ranges stay those of the 4-scale model.
"""

from .salience_detr_r50 import model

model.backbone.out_features = ["res2", "res3", "res4", "res5"]
model.neck.in_channels = [256, 512, 1024, 2048]
model.neck.num_outs = 4
model.transformer.encoder.max_num_embedding = 500
