"""Salience DETR with a plain ViT-B/16 backbone and ViTDet's simple feature pyramid (no official checkpoint).

The pyramid turns the stride-16 ViT map into 256-channel maps at strides 8/16/32; the channel mapper adds the
stride-64 level from the stride-32 map.
"""

from detectron2.config import LazyCall as L

from salience_detr.modeling.backbone import ViTBackbone

from .salience_detr_r50 import model

model.backbone = L(ViTBackbone)(
    embed_dim=768,
    depth=12,
    num_heads=12,
    patch_size=16,
    drop_path_rate=0.1,
    out_channels=256,
    out_features=["res3", "res4", "res5"],
    freeze_patch_embed=False,
)
model.neck.in_channels = [256, 256, 256]
