"""CPU inference speed-ups that keep the detections (to float rounding): measured in benchmarks/speed.md.

Five levers, each applied in place to a model in eval mode:

- ``fuse_conv_bn`` (``modeling.fuse``): the backbone's FrozenBN and the transformer neck's BN folded into the
  convolutions before them, so they cost nothing.
- channels-last convolution weights: the backbone and necks then run NHWC, and flattening the maps into tokens
  (B, C, H, W) -> (B, HW, C) reads them in order.
- ``OneDnnLinear``: the float32 linear layers run oneDNN's matmul instead of the BLAS one. PyTorch's BLAS is MKL,
  which on AMD CPUs reaches about half of oneDNN's speed (93 against 190 GFLOP/s for the encoder's value
  projection on one Zen 4 core).
- ``fuse_ffn_relu``: each post-norm FFN's first linear layer applies the ReLU as a oneDNN post-op.
- ``OneDnnConv2d``: every convolution runs oneDNN's. On one thread PyTorch sends 1x1 convolutions to its own im2col
  path (2.3x slower on a 512 -> 256 channel map at stride 8); with more threads it picks oneDNN itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d as DetectronConv2d
from torch import Tensor, nn

from salience_detr.layers.post_norm import PostNormLayer

from .fuse import fuse_conv_bn

__all__ = [
    "OneDnnConv2d",
    "OneDnnDetectronConv2d",
    "OneDnnLinear",
    "OneDnnLinearReLU",
    "fuse_ffn_relu",
    "optimize_for_cpu_inference",
    "use_channels_last",
    "use_onednn_conv",
    "use_onednn_linear",
]


def _onednn_applies(x: Tensor, weight: Tensor) -> bool:
    """oneDNN serves float32 CPU inference only: autograd, tracing (FLOP counts, ONNX) and compiling see F.linear."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    )


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` with the same parameters and state dict whose CPU float32 inference runs on oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        if _onednn_applies(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class OneDnnLinearReLU(nn.Linear):
    """``relu(linear(x))`` in one oneDNN call on CPU float32 inference (the ReLU as the matmul's post-op)."""

    def forward(self, x: Tensor) -> Tensor:
        if _onednn_applies(x, self.weight):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "relu", [], "")
        return torch.relu(F.linear(x, self.weight, self.bias))


def _onednn_conv2d(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv``'s convolution of ``x`` (no norm, no activation), on oneDNN where it applies."""
    if (
        conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and x.numel()
        and _onednn_applies(x, conv.weight)
    ):
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, "none", [], ""
        )
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class OneDnnConv2d(nn.Conv2d):
    """``nn.Conv2d`` with the same parameters whose CPU float32 inference runs on oneDNN."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if weight is self.weight and bias is self.bias:
            return _onednn_conv2d(self, x)
        return super()._conv_forward(x, weight, bias)


class OneDnnDetectronConv2d(DetectronConv2d):
    """detectron2's ``Conv2d`` (convolution, then its optional norm and activation) with the convolution on oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        x = _onednn_conv2d(self, x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _require_onednn(lever: str) -> None:
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError(
            f"{lever} needs PyTorch built with oneDNN (torch.backends.mkldnn.is_available() is False); "
            "leave this lever off on this build."
        )


def _swap_classes(model: nn.Module, swaps: dict[type, type], lever: str) -> int:
    """Give every module whose exact type is a key of ``swaps`` the value's class (same state); returns how many."""
    _require_onednn(lever)
    converted = 0
    for module in model.modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]
            converted += 1
    return converted


def use_onednn_linear(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into an ``OneDnnLinear`` in place; returns how many.

    Subclasses (the output projection inside ``nn.MultiheadAttention``, which calls its weights directly) stay.
    """
    return _swap_classes(model, {nn.Linear: OneDnnLinear}, "use_onednn_linear")


def fuse_ffn_relu(model: nn.Module) -> int:
    """Give every post-norm layer's FFN a ``linear1`` that applies the ReLU in its matmul; returns how many.

    One pass over the (tokens, 2048) hidden activations less per encoder and decoder layer; the values are the same.
    """
    _require_onednn("fuse_ffn_relu")
    fused = 0
    for module in model.modules():
        if isinstance(module, PostNormLayer) and not module.relu_in_linear1 and isinstance(module.linear1, nn.Linear):
            module.linear1.__class__ = OneDnnLinearReLU
            module.relu_in_linear1 = True
            fused += 1
    return fused


def use_onednn_conv(model: nn.Module) -> int:
    """Turn every ``nn.Conv2d`` and detectron2 ``Conv2d`` into its oneDNN counterpart in place; returns how many."""
    swaps = {nn.Conv2d: OneDnnConv2d, DetectronConv2d: OneDnnDetectronConv2d}
    return _swap_classes(model, swaps, "use_onednn_conv")


@torch.no_grad()
def use_channels_last(model: nn.Module) -> int:
    """Store every 2-D convolution's weight channels-last, in place; returns how many.

    A convolution with channels-last weights returns channels-last maps whatever the layout of its input, so the
    backbone, the necks and what follows them run NHWC with no conversion call in the model code.
    """
    converted = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
            converted += 1
    return converted


def optimize_for_cpu_inference(
    model: nn.Module,
    fuse_bn: bool = True,
    channels_last: bool = True,
    onednn_linear: bool = True,
    onednn_conv: bool = True,
    ffn_relu: bool = True,
) -> dict[str, int]:
    """Apply the chosen levers in place to a model in eval mode; returns how many modules each one changed.

    The model must never train afterwards (the folded batch norms are gone), so a model in training mode is refused.
    """
    if any(module.training for module in model.modules()):
        raise RuntimeError(
            "optimize_for_cpu_inference folds batch norms and changes layers for inference only; call model.eval() "
            "first and apply it only to a model used for inference."
        )
    changed = {}
    if fuse_bn:
        changed["fuse_bn"] = fuse_conv_bn(model)
    if channels_last:
        changed["channels_last"] = use_channels_last(model)
    if onednn_linear:
        changed["onednn_linear"] = use_onednn_linear(model)
    if onednn_conv:
        changed["onednn_conv"] = use_onednn_conv(model)
    if ffn_relu:
        changed["ffn_relu"] = fuse_ffn_relu(model)
    return changed
