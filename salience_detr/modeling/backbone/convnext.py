"""ConvNeXt backbone (the released ConvNeXt-L) as a detectron2 ``Backbone``.

The official Salience DETR ConvNeXt is a copy of torchvision's ConvNeXt (same ``features.*`` module tree,
LayerNorm eps 1e-6, layer scale 1e-6), so this wrapper reuses torchvision's model: the official checkpoint keys
load unchanged and the features are the same computation.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from .base import StagedFeaturesBackbone

__all__ = ["ConvNeXtBackbone"]


class ConvNeXtBackbone(StagedFeaturesBackbone):
    """torchvision ConvNeXt trunk; defaults are ConvNeXt-L with the official detection settings
    (drop path 0.5, first stage frozen, outputs of stages 1-3: 384/768/1536 channels at strides 8/16/32)."""

    def __init__(
        self,
        dims: Sequence[int] = (192, 384, 768, 1536),
        depths: Sequence[int] = (3, 3, 27, 3),
        drop_path_rate: float = 0.5,
        layer_scale: float = 1e-6,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        freeze_first_stage: bool = True,
    ) -> None:
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"ConvNeXt needs 4 stage widths and 4 depths, got dims={dims}, depths={depths}")
        settings = [CNBlockConfig(dims[i], dims[i + 1] if i < 3 else None, depths[i]) for i in range(4)]
        # torchvision's classifier is dropped: detection uses the trunk only, as the official model does.
        trunk = ConvNeXt(settings, stochastic_depth_prob=drop_path_rate, layer_scale=layer_scale).features
        strides = [4 * 2**i for i in range(4)]
        super().__init__(trunk, dims, strides, out_features, freeze_first_stage)
