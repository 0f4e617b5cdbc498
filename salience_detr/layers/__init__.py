"""Building blocks that depend on torch alone (no detectron2), so they import on any machine."""

from .ms_deform_attn import (
    MultiScaleDeformableAttention,
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_pytorch,
)

__all__ = [
    "MultiScaleDeformableAttention",
    "multi_scale_deformable_attn",
    "multi_scale_deformable_attn_pytorch",
]
