"""Salience DETR with a ConvNeXt-L backbone (official release: 54.2 AP at 12 epochs on COCO val2017).

torchvision's ConvNeXt-L trunk, drop path 0.5, stem + stage 0 frozen, stages 1-3 (384/768/1536 channels at strides
8/16/32) into the channel mapper, whose extra stride-64 level comes from the raw 1536-channel stage.
"""

from detectron2.config import LazyCall as L

from salience_detr.modeling.backbone import ConvNeXtBackbone

from .salience_detr_r50 import model

model.backbone = L(ConvNeXtBackbone)(
    dims=(192, 384, 768, 1536),
    depths=(3, 3, 27, 3),
    drop_path_rate=0.5,
    out_features=["res3", "res4", "res5"],
    freeze_first_stage=True,
)
model.neck.in_channels = [384, 768, 1536]
