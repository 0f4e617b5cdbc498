"""Salience DETR R50 4-scale with the RoI refinement head (issue #5, design docs/roi_refine.md).

The head is defined once here (``roi_refine_head()``, a fresh node per call); every ``*_roi_*`` experiment config
puts it on its own model. The head infers the level strides from the feature maps, so it fits every backbone.
With ``model.roi_refine = None`` this is exactly the official R50 model.
"""

from detectron2.config import LazyCall as L
from omegaconf import DictConfig

from salience_detr.modeling.roi_refine import RoIRefineHead

from .salience_detr_r50 import model


def roi_refine_head() -> DictConfig:
    """The default head (design defaults), its width taken from the model's embed_dim."""
    return L(RoIRefineHead)(
        embed_dim="${..embed_dim}",
        num_rois=100,
        num_layers=2,
        num_heads=8,
        ffn_dim=1024,
        dropout=0.0,
        pooler_resolution=7,
        sampling_ratio=0,
        canonical_box_size=224,
        canonical_level=4,
        box_weights=[10.0, 10.0, 5.0, 5.0],
        use_iou_head=True,
        iou_beta=0.0,  # refined boxes keep the class scores; 0.2 rescores with the IoU head (benchmarks/roi_refine.md)
        loss_weights={"loss_roi_bbox": 5.0, "loss_roi_giou": 2.0, "loss_roi_iou": 1.0},
        warmup_iters=500,
        positive_iou=0.5,  # None: train on the matched queries only
        detach_features=True,  # False: the RoI loss also trains the neck and backbone through the crops
    )


model.roi_refine = roi_refine_head()

__all__ = ["model"]
