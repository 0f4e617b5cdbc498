"""Shared bases of the wrapped backbones: stage names, the padded-batch contract, and torchvision-layout trunks.

ConvNeXt and Swin are both torchvision ``features`` Sequentials (stem, then stage and downsampler in turn);
FocalNet and ViT only share the padded-batch contract and the stage names.
"""

from __future__ import annotations

from collections.abc import Sequence

from detectron2.modeling import Backbone
from torch import Tensor, nn

__all__ = ["PaddedBatchBackbone", "STAGE_NAMES", "StagedFeaturesBackbone", "check_out_features"]

#: Output names of the four stages, by stride 4, 8, 16, 32 (detectron2's ResNet naming).
STAGE_NAMES = ("res2", "res3", "res4", "res5")


def check_out_features(out_features: Sequence[str]) -> list[str]:
    """Validate requested stage names early, so a config typo fails at build time with the valid names."""
    if not out_features or any(name not in STAGE_NAMES for name in out_features):
        raise ValueError(f"out_features {list(out_features)} must be a non-empty subset of {STAGE_NAMES}")
    return list(out_features)


class PaddedBatchBackbone(Backbone):
    """Backbone fed batches padded to a multiple of 32, the coarsest stride, so every level aligns with the mask."""

    @property
    def size_divisibility(self) -> int:
        return 32

    def check_batch(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects a (N, C, H, W) batch, got shape {tuple(x.shape)}")


class StagedFeaturesBackbone(PaddedBatchBackbone):
    """A torchvision trunk whose ``features`` Sequential is stem, stage, down, stage, down, stage, down, stage.

    Stage ``i`` is ``features[2i + 1]``; its output is named ``STAGE_NAMES[i]``. ``freeze_first_stage`` mirrors the
    official ``freeze_indices=(0,)``: the stem, stage 0 and the downsampler after it (``features[:3]``) get no
    gradient. Subclasses set ``channels_last`` when the trunk runs in (N, H, W, C).
    """

    channels_last = False

    def __init__(
        self,
        features: nn.Sequential,
        channels: Sequence[int],
        strides: Sequence[int],
        out_features: Sequence[str],
        freeze_first_stage: bool,
    ) -> None:
        super().__init__()
        self.features = features
        self._out_features = check_out_features(out_features)
        self._out_feature_channels = dict(zip(STAGE_NAMES, channels))
        self._out_feature_strides = dict(zip(STAGE_NAMES, strides))
        self._num_layers_needed = 2 * max(STAGE_NAMES.index(name) for name in out_features) + 2
        if freeze_first_stage:
            for layer in self.features[:3]:
                layer.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.check_batch(x)
        outputs = {}
        for index, layer in enumerate(self.features[: self._num_layers_needed]):
            x = layer(x)
            name = STAGE_NAMES[index // 2] if index % 2 == 1 else None
            if name in self._out_features:
                outputs[name] = x.permute(0, 3, 1, 2) if self.channels_last else x
        return outputs
