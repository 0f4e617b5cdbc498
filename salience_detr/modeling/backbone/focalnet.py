"""FocalNet backbone (the released FocalNet-L, LRF, focal level 4) as a detectron2 ``Backbone``.

The official model is Microsoft's FocalNet (channels-last, ``nn.Linear`` projections, downsampler at the end of
each stage) plus one LayerNorm per returned stage. timm ports exactly that network, keeping it maintained: NCHW
with 1x1 convs instead of the linears and the downsampler moved to the start of the next stage. The checkpoint
rules in :mod:`salience_detr.checkpoint.backbone_layouts` undo those renames and reshapes; the computation is the
same up to float rounding. The one behavioural difference, the official stem padding its input to a multiple of
the patch size, is reproduced here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.focalnet import FocalNet
from torch import Tensor, nn

from .base import STAGE_NAMES, PaddedBatchBackbone, check_out_features

__all__ = ["FocalNetBackbone"]


class FocalNetBackbone(PaddedBatchBackbone):
    """timm FocalNet trunk (``stem``, ``layers.{0-3}``) with a LayerNorm on each returned stage.

    Defaults are FocalNet-L fl4 with the official detection settings: overlapping conv embeddings, post-norm
    blocks with layer scale 1e-4, normalised modulator, drop path 0.5, first stage frozen, outputs of stages 1-3
    (384/768/1536 channels at strides 8/16/32).
    """

    def __init__(
        self,
        embed_dim: int = 192,
        depths: Sequence[int] = (2, 2, 18, 2),
        focal_level: int = 4,
        focal_window: int = 3,
        drop_path_rate: float = 0.5,
        out_features: Sequence[str] = ("res3", "res4", "res5"),
        freeze_first_stage: bool = True,
    ) -> None:
        super().__init__()
        if len(depths) != 4:
            raise ValueError(f"FocalNet needs 4 stage depths, got {depths}")
        self._out_features = check_out_features(out_features)
        model = FocalNet(
            embed_dim=embed_dim,
            depths=tuple(depths),
            focal_levels=(focal_level,) * 4,
            focal_windows=(focal_window,) * 4,
            use_overlap_down=True,
            use_post_norm=True,
            normalize_modulator=True,
            layerscale_value=1e-4,
            drop_path_rate=drop_path_rate,
            num_classes=0,
        )
        # Only the trunk is kept (timm's final norm and head are unused by the detector, as in the official one).
        self.stem = model.stem
        self.layers = model.layers
        channels = [embed_dim * 2**i for i in range(4)]
        self._out_feature_channels = dict(zip(STAGE_NAMES, channels))
        self._out_feature_strides = {name: 4 * 2**i for i, name in enumerate(STAGE_NAMES)}
        self.output_norms = nn.ModuleDict(
            {name: LayerNorm2d(self._out_feature_channels[name], eps=1e-5) for name in self._out_features}
        )
        self._num_stages_needed = max(STAGE_NAMES.index(name) for name in self._out_features) + 1
        if freeze_first_stage:
            # Official freeze_indices=(0,): patch embed and stage 0, whose downsampler timm files under layers.1.
            for module in (self.stem, self.layers[0], self.layers[1].downsample):
                module.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.check_batch(x)
        stem_stride = self._out_feature_strides["res2"]
        pad_h, pad_w = (-x.shape[-2]) % stem_stride, (-x.shape[-1]) % stem_stride
        x = self.stem(F.pad(x, (0, pad_w, 0, pad_h)))
        outputs = {}
        for name, stage in zip(STAGE_NAMES[: self._num_stages_needed], self.layers):
            x = stage(x)
            if name in self._out_features:
                outputs[name] = self.output_norms[name](x)
        return outputs
