"""Building blocks that depend on torch alone (no detectron2), so they import on any machine."""

from .box_ops import inverse_sigmoid
from .mlp import MLP, init_box_head, init_class_head
from .ms_deform_attn import (
    MultiScaleDeformableAttention,
    multi_scale_deformable_attn,
    multi_scale_deformable_attn_pytorch,
)
from .post_norm import PostNormLayer

__all__ = [
    "MLP",
    "PostNormLayer",
    "init_box_head",
    "init_class_head",
    "inverse_sigmoid",
    "MultiScaleDeformableAttention",
    "multi_scale_deformable_attn",
    "multi_scale_deformable_attn_pytorch",
]
