"""Necks of Salience DETR: the backbone ChannelMapper (docs/model.md#channel-mapper) and the RepVGG-plus PAN that
fuses the encoder memory across levels (the "transformer neck", docs/model.md#transformer-neck).

Module and parameter names mirror the official checkpoint (``neck.convs.{i}.{0,1}``,
``transformer.neck.{lateral_convs,layer_blocks,pan_blocks,downsample_blocks}``) so the converter maps them 1:1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import get_norm
from torch import Tensor, nn

__all__ = ["ChannelMapper", "CSPRepPluXLayer", "GlobalContextGate", "RepVGGPluXNetwork", "RepVggPluXBlock"]


def _check_levels(features: Sequence[Tensor], expected: int, owner: str) -> None:
    if len(features) != expected:
        raise ValueError(f"{owner} expects {expected} feature maps (one per configured level), got {len(features)}")


class ChannelMapper(nn.Module):
    """Maps each backbone level to ``out_channels`` with a 1x1 conv + GroupNorm (no activation).

    Levels beyond the inputs come from 3x3 stride-2 convs: the first on the raw last input (C5, not its mapped
    version), each further one on the previous extra output.
    """

    def __init__(
        self, in_channels: Sequence[int], out_channels: int = 256, num_outs: int = 4, num_groups: int = 32
    ) -> None:
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) must be at least the number of inputs ({len(in_channels)})")
        self.in_channels = list(in_channels)
        self.num_channels = [out_channels] * num_outs
        self.convs = nn.ModuleList(self._conv_norm(c, out_channels, 1, 1, num_groups) for c in in_channels)
        extra_in = self.in_channels[-1]
        for _ in range(num_outs - len(in_channels)):
            self.convs.append(self._conv_norm(extra_in, out_channels, 3, 2, num_groups))
            extra_in = out_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight, gain=1)

    @staticmethod
    def _conv_norm(in_ch: int, out_ch: int, kernel: int, stride: int, num_groups: int) -> nn.Sequential:
        conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)
        return nn.Sequential(conv, nn.GroupNorm(num_groups, out_ch))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        _check_levels(features, len(self.in_channels), "ChannelMapper")
        outs = [conv(feature) for conv, feature in zip(self.convs, features)]
        extra_input = features[-1]
        for conv in self.convs[len(features) :]:
            outs.append(conv(extra_input))
            extra_input = outs[-1]
        return outs


def _conv_norm_act(
    in_ch: int, out_ch: int, kernel: int, norm: str, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Bias-free conv -> norm (-> SiLU): the "CNA" unit of the transformer neck, keys ``0`` (conv) and ``1`` (norm)."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False)
    layers = [conv, get_norm(norm, out_ch)]
    if act:
        layers.append(nn.SiLU())  # out of place: an in-place SiLU copies its input for the backward
    return nn.Sequential(*layers)


class GlobalContextGate(nn.Module):
    """GCNet-style channel gate: softmax-weighted spatial context -> bottleneck -> sigmoid scale of the input.

    The attention pooling runs over every position, padding included, as in the official model.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if channels < reduction:
            raise ValueError(f"channels ({channels}) must be at least the reduction factor ({reduction})")
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.se_module = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(x) * x

    def gate(self, x: Tensor) -> Tensor:
        """The (B, C, 1, 1) channel scale of ``x`` (``forward`` multiplies ``x`` by it)."""
        batch, channels = x.shape[:2]
        attention = self.conv_mask(x).flatten(2).softmax(dim=-1)  # (B, 1, HW)
        # (B, C, HW) @ (B, HW, 1): the bmm that the official (B, 1, C, HW) @ (B, 1, HW, 1) matmul runs, bit-identical
        context = torch.bmm(x.flatten(2), attention.view(batch, -1, 1))
        return self.se_module(context.view(batch, channels, 1, 1))


class RepVggPluXBlock(nn.Module):
    """Residual RepVGG block: SiLU(BN(conv3x3_g(x)) + BN(conv1x1_g(x))) -> context gate -> + x."""

    def __init__(self, channels: int, groups: int = 4, norm: str = "BN") -> None:
        super().__init__()
        self.conv1 = _conv_norm_act(channels, channels, 3, norm, groups=groups, act=False)
        self.conv2 = _conv_norm_act(channels, channels, 1, norm, groups=groups, act=False)
        self.activation = nn.SiLU()  # out of place, see _conv_norm_act
        self.se_module = GlobalContextGate(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = self.activation(self.conv1(x) + self.conv2(x))
        return self.se_module(y) + x


class CSPRepPluXLayer(nn.Module):
    """CSP layer: ``bottlenecks(conv1(x)) + conv2(x)`` with two 1x1 CNA stems (expansion 1, no conv3)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3, groups: int = 4, norm: str = "BN"):
        super().__init__()
        self.conv1 = _conv_norm_act(in_channels, out_channels, 1, norm)
        self.conv2 = _conv_norm_act(in_channels, out_channels, 1, norm)
        self.bottlenecks = nn.Sequential(*(RepVggPluXBlock(out_channels, groups, norm) for _ in range(num_blocks)))

    def forward(self, x: Tensor) -> Tensor:
        return self.bottlenecks(self.conv1(x)) + self.conv2(x)


class RepVGGPluXNetwork(nn.Module):
    """Path-aggregation network (top-down then bottom-up) built from CSP RepVGG-plus layers, levels finest first.

    Top-down, each coarser map goes through its lateral CNA, and that lateral output (not the map fed into it)
    is what the bottom-up path later fuses, exactly like the official network. Concatenations put the
    resampled map first. ``norm`` takes detectron2 ``get_norm`` names ("BN", "SyncBN", ...).
    """

    def __init__(
        self,
        in_channels_list: Sequence[int] = (256,) * 4,
        out_channels_list: Sequence[int] = (256,) * 4,
        groups: int = 4,
        num_blocks: int = 3,
        norm: str = "BN",
    ) -> None:
        super().__init__()
        ins, outs = list(in_channels_list), list(out_channels_list)
        if len(ins) != len(outs) or len(ins) < 2:
            raise ValueError(f"need matching in/out channel lists of at least 2 levels, got {ins} and {outs}")
        self.num_levels = len(ins)
        self.lateral_convs = nn.ModuleList()
        self.layer_blocks = nn.ModuleList()
        for level in range(1, self.num_levels):
            lateral_in = ins[level] if level == self.num_levels - 1 else outs[level]
            self.lateral_convs.append(_conv_norm_act(lateral_in, outs[level - 1], 1, norm))
            self.layer_blocks.append(
                CSPRepPluXLayer(outs[level - 1] + ins[level - 1], outs[level - 1], num_blocks, groups, norm)
            )
        self.downsample_blocks = nn.ModuleList()
        self.pan_blocks = nn.ModuleList()
        for level in range(self.num_levels - 1):
            self.downsample_blocks.append(_conv_norm_act(outs[level], outs[level + 1], 3, norm, stride=2))
            self.pan_blocks.append(
                CSPRepPluXLayer(outs[level + 1] + outs[level], outs[level + 1], num_blocks, groups, norm)
            )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        _check_levels(features, self.num_levels, "RepVGGPluXNetwork")
        inner = [features[-1]]
        for level in range(self.num_levels - 1, 0, -1):
            lateral = self.lateral_convs[level - 1](inner[0])
            inner[0] = lateral
            finer = features[level - 1]
            upsampled = F.interpolate(lateral, size=finer.shape[-2:], mode="nearest")
            inner.insert(0, self.layer_blocks[level - 1](torch.cat([upsampled, finer], dim=1)))
        outputs = [inner[0]]
        for level in range(self.num_levels - 1):
            downsampled = self.downsample_blocks[level](outputs[-1])
            outputs.append(self.pan_blocks[level](torch.cat([downsampled, inner[level + 1]], dim=1)))
        return outputs
