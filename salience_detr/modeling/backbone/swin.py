"""Swin Transformer backbone (the released Swin-L, IN-22k, window 7) as a detectron2 ``Backbone``.

The official Salience DETR Swin is a copy of torchvision's ``SwinTransformer`` (same ``features.*`` tree and
shifted-window attention), so this wrapper reuses torchvision's model: the official keys only lose their
``backbone.0.`` wrapper prefix and the features are the same computation. torchvision pads every attention input
to a multiple of the window and odd maps before patch merging, so inputs of any size work.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision.models.swin_transformer import SwinTransformer

from .base import StagedFeaturesBackbone

__all__ = ["SwinBackbone"]


class SwinBackbone(StagedFeaturesBackbone):
    """torchvision Swin trunk (``features.0`` patch embed, ``features.{2,4,6}`` patch merging).

    Defaults are Swin-L with the official detection settings: drop path 0.2, first stage frozen, the raw outputs
    of stages 1-3 (no extra norm; 384/768/1536 channels at strides 8/16/32).
    """

    channels_last = True

    def __init__(
        self,
        embed_dim: int = 192,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (6, 12, 24, 48),
        window_size: int = 7,
        patch_size: int = 4,
        drop_path_rate: float = 0.2,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        freeze_first_stage: bool = True,
    ) -> None:
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError(f"Swin needs 4 depths and 4 head counts, got depths={depths}, num_heads={num_heads}")
        model = SwinTransformer(
            patch_size=[patch_size, patch_size],
            embed_dim=embed_dim,
            depths=list(depths),
            num_heads=list(num_heads),
            window_size=[window_size, window_size],
            stochastic_depth_prob=drop_path_rate,
        )
        # The final norm and classifier are dropped: the official detector taps the stages directly.
        channels = [embed_dim * 2**i for i in range(4)]
        strides = [patch_size * 2**i for i in range(4)]
        super().__init__(model.features, channels, strides, out_features, freeze_first_stage)
