"""Salience DETR with a FocalNet-L backbone (LRF, focal level 4, IN-22k; official release: 57.3 AP at 12 epochs).

timm's FocalNet trunk with the official detection settings (post-norm blocks, layer scale, normalised modulator,
drop path 0.5), patch embed + stage 0 frozen, LayerNorm'd stages 1-3 (384/768/1536 channels at strides 8/16/32)
into the channel mapper, whose extra stride-64 level comes from the 1536-channel stage.
"""

from detectron2.config import LazyCall as L

from salience_detr.modeling.backbone import FocalNetBackbone

from .salience_detr_r50 import model

model.backbone = L(FocalNetBackbone)(
    embed_dim=192,
    depths=(2, 2, 18, 2),
    focal_level=4,
    focal_window=3,
    drop_path_rate=0.5,
    out_features=["res3", "res4", "res5"],
    freeze_first_stage=True,
)
model.neck.in_channels = [384, 768, 1536]
