"""ConvNeXt backbone (the released ConvNeXt-L) as a detectron2 ``Backbone``, and the shared base of the
torchvision-layout trunks (ConvNeXt, Swin).

The official Salience DETR ConvNeXt is a copy of torchvision's ConvNeXt (same ``features.*`` module tree,
LayerNorm eps 1e-6, layer scale 1e-6), so this wrapper reuses torchvision's model: the official checkpoint keys
load unchanged and the features are the same computation.
"""

from __future__ import annotations

from collections.abc import Sequence

from detectron2.modeling import Backbone
from torch import Tensor, nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

__all__ = ["ConvNeXtBackbone", "PaddedBatchBackbone", "STAGE_NAMES", "StagedFeaturesBackbone", "check_out_features"]

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
