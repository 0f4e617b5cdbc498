"""Salience DETR with a Swin-L backbone (IN-22k, window 7; official release: 56.5 AP at 12 epochs on COCO val2017).

torchvision's Swin trunk, drop path 0.2, patch embed + stage 0 frozen, the raw stages 1-3 (384/768/1536 channels at
strides 8/16/32) into the channel mapper, whose extra stride-64 level comes from the raw 1536-channel stage.
"""

from detectron2.config import LazyCall as L

from salience_detr.modeling.backbone import SwinBackbone

from .salience_detr_r50 import model

model.backbone = L(SwinBackbone)(
    embed_dim=192,
    depths=(2, 2, 18, 2),
    num_heads=(6, 12, 24, 48),
    window_size=7,
    drop_path_rate=0.2,
    out_features=["res3", "res4", "res5"],
    freeze_first_stage=True,
)
model.neck.in_channels = [384, 768, 1536]
