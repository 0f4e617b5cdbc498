"""Plain ViT backbone (timm) with ViTDet's simple feature pyramid, as a detectron2 ``Backbone``.

A plain ViT has one stride-16 map. ViTDet (Li et al., 2022) showed a detector needs no hierarchical trunk: the
last map is upsampled by a stride-2 transposed conv, kept, or max-pooled, and each result goes through a
1x1 and a 3x3 conv with channel LayerNorms. That gives the three maps (strides 8/16/32) Salience DETR's channel
mapper expects. There is no official Salience DETR checkpoint for it; start from timm ImageNet weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.layers import LayerNorm2d
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .base import PaddedBatchBackbone

__all__ = ["ViTBackbone", "simple_pyramid_level"]

#: Pyramid scale factor of each output, relative to the ViT's stride-16 map.
PYRAMID_SCALES = {"res3": 2.0, "res4": 1.0, "res5": 0.5}


def simple_pyramid_level(in_channels: int, out_channels: int, scale: float) -> nn.Sequential:
    """One ViTDet pyramid branch: resample by ``scale`` (2, 1 or 0.5), then 1x1 and 3x3 conv, each + LayerNorm."""
    if scale == 2.0:
        resample = [nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)]
        in_channels //= 2
    elif scale == 1.0:
        resample = []
    elif scale == 0.5:
        resample = [nn.MaxPool2d(kernel_size=2, stride=2)]
    else:
        raise ValueError(f"pyramid scale must be 2.0, 1.0 or 0.5, got {scale}")
    return nn.Sequential(
        *resample,
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        LayerNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_channels),
    )


class ViTBackbone(PaddedBatchBackbone):
    """timm ``VisionTransformer`` (global attention, interpolated position embedding for any input size) whose
    last block output feeds the simple pyramid. Defaults are ViT-B/16 with drop path 0.1 and 256-channel outputs.

    ``freeze_patch_embed`` freezes the patch projection, class token and position embedding, the ViT counterpart
    of the frozen stem of the other backbones.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch_size: int = 16,
        pretrain_img_size: int = 224,
        drop_path_rate: float = 0.1,
        out_channels: int = 256,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        if not out_features or any(name not in PYRAMID_SCALES for name in out_features):
            raise ValueError(f"out_features {list(out_features)} must be a non-empty subset of {list(PYRAMID_SCALES)}")
        if patch_size != 16:
            raise ValueError(f"the pyramid assumes a stride-16 ViT (patch_size=16), got patch_size={patch_size}")
        # No final norm: ViTDet feeds the raw last block to the pyramid, and an unused norm would break DDP.
        self.vit = VisionTransformer(
            img_size=pretrain_img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            num_classes=0,
            global_pool="",
            final_norm=False,
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
        )
        self.pyramid = nn.ModuleDict(
            {name: simple_pyramid_level(embed_dim, out_channels, PYRAMID_SCALES[name]) for name in out_features}
        )
        self._out_features = list(out_features)
        self._out_feature_channels = {name: out_channels for name in out_features}
        self._out_feature_strides = {name: int(patch_size / PYRAMID_SCALES[name]) for name in out_features}
        if freeze_patch_embed:
            for parameter in (*self.vit.patch_embed.parameters(), self.vit.cls_token, self.vit.pos_embed):
                parameter.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.check_batch(x)
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(
                f"ViTBackbone needs H and W multiples of 32 (its max-pooled level), got {tuple(x.shape[-2:])}; "
                "pad the batch to size_divisibility first"
            )
        (last,) = self.vit.forward_intermediates(x, indices=1, output_fmt="NCHW", intermediates_only=True)
        return {name: self.pyramid[name](last) for name in self._out_features}
