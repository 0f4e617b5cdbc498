"""Salience DETR model: importing this package registers ``SalienceDETR`` in detectron2's META_ARCH_REGISTRY."""

from .meta_arch import SalienceDETR

__all__ = ["SalienceDETR"]
