"""Batch normalisation folded into the preceding convolution, for inference only.

At inference a batch norm is a fixed per-channel affine map, so ``norm(conv(x))`` equals one convolution with
rescaled weights and a bias: the backbone's FrozenBN (detectron2 ``Conv2d.norm``) and the transformer neck's BN
(``conv -> BN -> SiLU`` sequences) then cost nothing. Folding uses the running statistics and drops the norm
modules, so a folded model must never train again: the function refuses a model in training mode, and the tools
call it only behind an explicit option.
"""

from __future__ import annotations

import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["FOLDABLE_NORMS", "fold_norm_into_conv", "fuse_conv_bn"]

#: The norms that inference can fold into a convolution (a fixed per-channel affine map there).
FOLDABLE_NORMS = (FrozenBatchNorm2d, _BatchNorm)


def _norm_scale_shift(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(scale, shift)`` with ``norm(y) == y * scale + shift`` at inference."""
    if norm.running_var is None or norm.running_mean is None:
        raise ValueError(
            f"{type(norm).__name__} without running statistics (track_running_stats=False) normalises with the "
            "batch's own statistics even at inference, so it cannot be folded; leave this model unfused."
        )
    scale = (norm.running_var + norm.eps).rsqrt()
    shift = -norm.running_mean * scale
    if norm.weight is not None:
        scale = scale * norm.weight
        shift = shift * norm.weight + norm.bias
    return scale, shift


@torch.no_grad()
def fold_norm_into_conv(conv: nn.Conv2d, norm: nn.Module) -> None:
    """Rescale ``conv``'s weights and set its bias so that ``conv(x)`` alone equals ``norm(conv(x))``."""
    if norm.num_features != conv.out_channels:
        raise ValueError(f"{type(norm).__name__} of {norm.num_features} channels after a conv of {conv.out_channels}")
    scale, shift = _norm_scale_shift(norm)
    weight = conv.weight.double() * scale.double().view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = shift.double() if conv.bias is None else conv.bias.double() * scale.double() + shift.double()
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    else:
        conv.bias.copy_(bias.to(conv.bias.dtype))


def _fuse_sequential(sequential: nn.Sequential) -> int:
    """Fold every ``Conv2d, BatchNorm`` pair of consecutive children; the norm becomes an ``nn.Identity``."""
    folded = 0
    names = list(sequential._modules)
    for first, second in zip(names, names[1:]):
        conv, norm = sequential._modules[first], sequential._modules[second]
        if type(conv) is nn.Conv2d and isinstance(norm, FOLDABLE_NORMS):
            fold_norm_into_conv(conv, norm)
            sequential._modules[second] = nn.Identity()
            folded += 1
    return folded


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold every batch norm that directly follows a convolution into it, in place; returns how many were folded.

    Covers detectron2 ``Conv2d`` modules with a FrozenBN or BN ``norm`` (the ResNet backbone) and
    ``nn.Sequential`` blocks of ``Conv2d`` then BN (the transformer neck). GroupNorm and LayerNorm depend on the
    input and stay. For evaluation, benchmarks and export only.
    """
    if any(module.training for module in model.modules()):
        raise RuntimeError(
            "fuse_conv_bn folds batch norms with their running statistics and removes them, so the model could not "
            "train correctly afterwards; call model.eval() first and fuse only a model used for inference."
        )
    folded = 0
    for module in list(model.modules()):
        norm = getattr(module, "norm", None)
        if isinstance(module, nn.Conv2d) and isinstance(norm, FOLDABLE_NORMS):
            fold_norm_into_conv(module, norm)
            module.norm = None
            folded += 1
        elif isinstance(module, nn.Sequential):
            folded += _fuse_sequential(module)
    return folded
