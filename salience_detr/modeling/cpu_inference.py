"""CPU inference speed-ups that keep the detections (to float rounding): measured in benchmarks/speed.md.

Nine levers, each applied in place to a model in eval mode:

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
- ``fuse_resnet_blocks``: the ResNet's ReLUs and residual adds become post-ops of its oneDNN convolutions, the sum
  written over a map the block owns. Maps over 32 MB (the stride-4 stage's) are otherwise mapped afresh from the
  kernel by glibc on every allocation, and their page faults cost as much as the convolution.
- ``chunk_ffn``: the post-norm FFNs run on 1,024 tokens at a time, so their (tokens, 2048) hidden activations stay
  small (43-71 MB per encoder layer unchunked, with the same page faults).
- ``reparameterize_repvgg``: each RepVGG block of the transformer neck becomes one 3x3 convolution with the SiLU as a
  post-op (its 1x1 branch merged into the kernel), and its gate and residual one ``addcmul``.
- ``InferenceDeformableAttention``: the values' padding zeroed by an in-place product instead of ``masked_fill``, and
  the sampling locations' broadcasts run on contiguous rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d as DetectronConv2d
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from torch import Tensor, nn

from salience_detr.layers.ms_deform_attn import MultiScaleDeformableAttention
from salience_detr.layers.post_norm import PostNormLayer

from .fuse import FOLDABLE_NORMS, fold_norm_into_conv, fuse_conv_bn
from .neck import RepVggPluXBlock

__all__ = [
    "CPU_LEVERS",
    "FFN_CHUNK_ROWS",
    "FusedBasicBlock",
    "FusedBasicStem",
    "FusedBottleneckBlock",
    "FusedRepVggPluXBlock",
    "FusedResNetStage",
    "InferenceDeformableAttention",
    "OneDnnConv2d",
    "OneDnnDetectronConv2d",
    "OneDnnLinear",
    "OneDnnLinearReLU",
    "chunk_ffn",
    "fuse_ffn_relu",
    "fuse_resnet_blocks",
    "optimize_for_cpu_inference",
    "optimize_on_cpu",
    "reparameterize_repvgg",
    "use_channels_last",
    "use_inference_deformable_attention",
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
        return _fused_conv(conv, x, "none")
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


#: Rows per FFN call under ``chunk_ffn``: a (1024, 2048) hidden chunk is 8 MB, so it stays in cache and in the
#: allocator's heap (glibc maps every block over 32 MB afresh from the kernel, one page fault per 4 KB).
FFN_CHUNK_ROWS = 1024


def _fused_conv(conv: nn.Conv2d, x: Tensor, unary: str) -> Tensor:
    """``conv(x)`` on oneDNN with the elementwise ``unary`` ("none", "relu", "swish") applied inside it."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, unary, [], ""
    )


def _fused_conv_add_relu(conv: nn.Conv2d, x: Tensor, residual: Tensor, in_place: bool) -> Tensor:
    """``relu(conv(x) + residual)`` in one oneDNN convolution, written into ``residual`` when ``in_place``."""
    args = (conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, "add", 1.0, "relu", [], "")
    if in_place:
        return torch.ops.mkldnn._convolution_pointwise_.binary(residual, x, *args)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *args)


def _residual_output(block: nn.Module, last_conv: nn.Conv2d, out: Tensor, x: Tensor, input_owned: bool) -> Tensor:
    """A residual block's ``relu(last_conv(out) + shortcut(x))``, written over the shortcut's fresh output, or over
    ``x`` itself when the caller owns it: no new map of the block's size (at stride 4 a 53 MB page-faulted one)."""
    if block.shortcut is not None:
        return _fused_conv_add_relu(last_conv, out, _onednn_conv2d(block.shortcut, x), in_place=True)
    return _fused_conv_add_relu(last_conv, out, x, in_place=input_owned)


class FusedBottleneckBlock(BottleneckBlock):
    """detectron2's bottleneck block (norms folded) as three oneDNN convolutions on CPU float32 inference: the ReLUs
    and the residual add are their post-ops, so no pass over the maps of its own."""

    def forward(self, x: Tensor, input_owned: bool = False) -> Tensor:
        if not _onednn_applies(x, self.conv1.weight):
            return super().forward(x)
        out = _fused_conv(self.conv2, _fused_conv(self.conv1, x, "relu"), "relu")
        return _residual_output(self, self.conv3, out, x, input_owned)


class FusedBasicBlock(BasicBlock):
    """detectron2's basic block (norms folded) as two oneDNN convolutions with the ReLUs and the add as post-ops."""

    def forward(self, x: Tensor, input_owned: bool = False) -> Tensor:
        if not _onednn_applies(x, self.conv1.weight):
            return super().forward(x)
        return _residual_output(self, self.conv2, _fused_conv(self.conv1, x, "relu"), x, input_owned)


class FusedBasicStem(BasicStem):
    """detectron2's stem (norm folded) with its ReLU as the oneDNN convolution's post-op."""

    def forward(self, x: Tensor) -> Tensor:
        if not _onednn_applies(x, self.conv1.weight):
            return super().forward(x)
        return F.max_pool2d(_fused_conv(self.conv1, x, "relu"), kernel_size=3, stride=2, padding=1)


class FusedResNetStage(nn.Sequential):
    """A ResNet stage of fused blocks. Every block after the first may write its output over its input: only the
    block before it made that map and nothing else holds it (a forward hook on a block that keeps its output sees
    it overwritten by the next block)."""

    def forward(self, x: Tensor) -> Tensor:
        for index, block in enumerate(self):
            x = block(x, input_owned=index > 0)
        return x


_FUSED_RESNET = {BottleneckBlock: FusedBottleneckBlock, BasicBlock: FusedBasicBlock, BasicStem: FusedBasicStem}


def _fold_block_norms(block: nn.Module) -> bool:
    """Fold the batch norms of ``block``'s convolutions into them; False (nothing changed) where one cannot be
    folded (GroupNorm) or a convolution has its own activation."""
    convs = [child for child in block.children() if isinstance(child, nn.Conv2d)]
    foldable = all(
        getattr(conv, "activation", None) is None
        and isinstance(conv.padding, tuple)
        and conv.padding_mode == "zeros"
        and (getattr(conv, "norm", None) is None or isinstance(conv.norm, FOLDABLE_NORMS))
        for conv in convs
    )
    if foldable:
        for conv in convs:
            if getattr(conv, "norm", None) is not None:
                fold_norm_into_conv(conv, conv.norm)
                conv.norm = None
    return foldable


def fuse_resnet_blocks(model: nn.Module) -> int:
    """Give detectron2's ResNet stem and blocks (FrozenBN/BN, folded here if not yet) their fused classes, and
    their stages ``FusedResNetStage``, in place; returns how many stems and blocks. GroupNorm blocks stay."""
    _require_onednn("fuse_resnet_blocks")
    fused = 0
    for module in list(model.modules()):
        if type(module) in _FUSED_RESNET and _fold_block_norms(module):
            module.__class__ = _FUSED_RESNET[type(module)]
            fused += 1
    blocks = (FusedBottleneckBlock, FusedBasicBlock)
    for module in model.modules():
        if type(module) is nn.Sequential and len(module) and all(type(block) in blocks for block in module):
            module.__class__ = FusedResNetStage
    return fused


class FusedRepVggPluXBlock(RepVggPluXBlock):
    """The transformer neck's RepVGG block re-parameterised for inference: its 1x1 branch added into the centre of
    the 3x3 kernel (one grouped convolution instead of two and their sum), the SiLU as that convolution's oneDNN
    post-op, and the context gate's scaling and the residual add in one pass."""

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv1[0]
        if _onednn_applies(x, conv.weight):
            y = _fused_conv(conv, x, "swish")
        else:
            y = F.silu(F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups))
        return torch.addcmul(x, self.se_module.gate(y), y)


@torch.no_grad()
def _merge_repvgg_branches(block: RepVggPluXBlock) -> bool:
    """Fold both branches' norms, then the 1x1 kernel into the 3x3 one (their sum is one convolution); False, with
    nothing changed, where the branches are not a padded 3x3 and a 1x1 of the same stride and groups."""
    (big, big_norm), (small, small_norm) = list(block.conv1), list(block.conv2)
    foldable = all(isinstance(norm, (nn.Identity, *FOLDABLE_NORMS)) for norm in (big_norm, small_norm))
    shapes = (big.kernel_size, big.padding, small.kernel_size, small.padding) == ((3, 3), (1, 1), (1, 1), (0, 0))
    alike = (big.stride, big.dilation, big.groups) == (small.stride, small.dilation, small.groups)
    if not (foldable and shapes and alike and big.padding_mode == small.padding_mode == "zeros"):
        return False
    for index, (conv, norm) in enumerate(((big, big_norm), (small, small_norm))):
        if not isinstance(norm, nn.Identity):
            fold_norm_into_conv(conv, norm)
            (block.conv1, block.conv2)[index][1] = nn.Identity()
    big.weight[:, :, 1:2, 1:2] += small.weight
    if small.bias is not None:
        if big.bias is None:
            big.bias = nn.Parameter(torch.zeros_like(small.bias), requires_grad=False)
        big.bias += small.bias
    block.conv2 = None
    return True


def reparameterize_repvgg(model: nn.Module) -> int:
    """Re-parameterise every RepVGG block of the transformer neck (``FusedRepVggPluXBlock``) in place; returns how
    many. The 1x1 branch's weights are merged into the 3x3 convolution's and removed from the state dict."""
    _require_onednn("reparameterize_repvgg")
    merged = 0
    for module in list(model.modules()):
        if type(module) is RepVggPluXBlock and _merge_repvgg_branches(module):
            module.__class__ = FusedRepVggPluXBlock
            merged += 1
    return merged


class InferenceDeformableAttention(MultiScaleDeformableAttention):
    """Multi-scale deformable attention with two inference-only shortcuts, the same numbers for finite inputs:

    - the projected values' padding is zeroed by an in-place product with the 0/1 keep column (``masked_fill`` of the
      (18,071, 256) R50 values took 4.5 ms, plus a copy, against 0.5 ms);
    - the sampling locations' broadcasts run over the last L * P * 2 numbers of each head at once (broadcast over the
      points, the plain version ran loops of 2 numbers: 62 ms of the R50 encoder's forward).
    """

    def project_value(self, value: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        if key_padding_mask is None:
            return super().project_value(value, key_padding_mask)
        batch, num_values, _ = value.shape
        projected = self.value_proj(value.reshape(-1, self.embed_dim))
        projected.mul_((~key_padding_mask).reshape(-1, 1).to(projected.dtype))
        return projected.view(batch, num_values, self.num_heads, -1)

    def _sampling_locations(self, offsets: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tensor:
        batch, queries, _, levels, points, _ = offsets.shape
        per_head = offsets.view(batch, queries, self.num_heads, levels * points * 2)

        def over_points(per_level: Tensor) -> Tensor:  # (B, Q, L, 2) -> (B, Q, 1, L * P * 2), a value per point
            return per_level[:, :, None, :, None].expand(-1, -1, 1, -1, points, -1).reshape(batch, queries, 1, -1)

        if reference_points.shape[-1] == 2:
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)[:, None].expand(-1, points, -1).reshape(-1)
            return (over_points(reference_points) + per_head / normalizer).view(offsets.shape)
        centers, sizes = over_points(reference_points[..., :2]), over_points(reference_points[..., 2:])
        return (centers + per_head * (sizes * (0.5 / self.num_points))).view(offsets.shape)


def use_inference_deformable_attention(model: nn.Module) -> int:
    """Turn every ``MultiScaleDeformableAttention`` into an ``InferenceDeformableAttention`` in place (same state);
    returns how many."""
    return _swap_classes(model, {MultiScaleDeformableAttention: InferenceDeformableAttention}, None)


def chunk_ffn(model: nn.Module, rows: int = FFN_CHUNK_ROWS) -> int:
    """Run every post-norm layer's FFN on ``rows`` tokens at a time (``PostNormLayer.ffn_chunk_rows``); returns how
    many layers. Row by row the FFN is the same, so only the size of its hidden activations changes."""
    if rows < 1:
        raise ValueError(f"rows must be a positive number of tokens per FFN call, got {rows}")
    chunked = 0
    for module in model.modules():
        if isinstance(module, PostNormLayer) and module.ffn_chunk_rows is None:
            module.ffn_chunk_rows = rows
            chunked += 1
    return chunked


def _require_onednn(lever: str) -> None:
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError(
            f"{lever} needs PyTorch built with oneDNN (torch.backends.mkldnn.is_available() is False); "
            "leave this lever off on this build."
        )


def _swap_classes(model: nn.Module, swaps: dict[type, type], onednn_lever: str | None) -> int:
    """Give every module whose exact type is a key of ``swaps`` the value's class (same state); returns how many.
    ``onednn_lever``: the name of a lever that needs oneDNN (checked first), None for one that does not."""
    if onednn_lever is not None:
        _require_onednn(onednn_lever)
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


#: The levers in the order they apply (and the speed tool's ablation adds them): each changes a model in place and
#: returns how many modules it changed.
CPU_LEVERS: dict[str, Callable[[nn.Module], int]] = {
    "fuse_bn": fuse_conv_bn,
    "channels_last": use_channels_last,
    "onednn_conv": use_onednn_conv,
    "onednn_linear": use_onednn_linear,
    "ffn_relu": fuse_ffn_relu,
    "fuse_resnet": fuse_resnet_blocks,
    "ffn_chunks": chunk_ffn,
    "repvgg": reparameterize_repvgg,
    "deform_attn": use_inference_deformable_attention,
}


def optimize_on_cpu(model: nn.Module) -> dict[str, int] | None:
    """``optimize_for_cpu_inference`` (all levers) where it applies: a model in eval mode whose parameters are on the
    CPU, with PyTorch built with oneDNN. Elsewhere the model is left as it is and None returned."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    return optimize_for_cpu_inference(model)


def optimize_for_cpu_inference(model: nn.Module, **levers: bool) -> dict[str, int]:
    """Apply the levers of ``CPU_LEVERS`` in place, in its order, to a model in eval mode; returns how many modules
    each one changed. All apply unless switched off by name (``fuse_bn=False``); an unknown name is refused.

    The model must never train afterwards (the folded batch norms are gone), so a model in training mode is refused.
    """
    unknown = sorted(set(levers) - set(CPU_LEVERS))
    if unknown:
        raise TypeError(f"unknown CPU inference lever(s) {unknown}: the levers are {list(CPU_LEVERS)}")
    if any(module.training for module in model.modules()):
        raise RuntimeError(
            "optimize_for_cpu_inference folds batch norms and changes layers for inference only; call model.eval() "
            "first and apply it only to a model used for inference."
        )
    return {name: apply(model) for name, apply in CPU_LEVERS.items() if levers.get(name, True)}
