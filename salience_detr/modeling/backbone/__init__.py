"""Backbones as detectron2 ``Backbone``s: torchvision ConvNeXt / Swin, timm FocalNet / plain ViT (+ simple pyramid)."""

from .convnext import ConvNeXtBackbone
from .focalnet import FocalNetBackbone
from .swin import SwinBackbone
from .vit import ViTBackbone

__all__ = ["ConvNeXtBackbone", "FocalNetBackbone", "SwinBackbone", "ViTBackbone"]
