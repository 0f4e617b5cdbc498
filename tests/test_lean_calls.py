"""The call-lean blocks (layers.attention, MLP and FFN on rows, the neck's gate) give torch's values and gradients bit
for bit (the self-attention, whose fused query/key projection reorders sums: to float64 rounding).

Bit for bit, not close: the seeded loss curve of the tiny config moves by more than its 1e-5 tolerance within five
AdamW steps when one weight gradient sums its rows in another order.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from salience_detr.layers.attention import additive_mask, multihead_self_attention
from salience_detr.layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from salience_detr.layers.levels import cell_coordinates, valid_ratios
from salience_detr.layers.mlp import MLP
from salience_detr.layers.ms_deform_attn import MultiScaleDeformableAttention, multi_scale_deformable_attn
from salience_detr.layers.position_encoding import PositionEmbeddingSine, get_sine_pos_embed, sine_frequencies
from salience_detr.modeling.criterion import varifocal_loss
from salience_detr.modeling.encoder import encoder_reference_points
from salience_detr.modeling.neck import RepVggPluXBlock
from salience_detr.modeling.two_stage import encoder_output_proposals
from salience_detr.utils.dispatch_count import count_dispatch


def _run(function, inputs: list[torch.Tensor], module: nn.Module) -> tuple[list[torch.Tensor], int]:
    """Output, input and parameter gradients of ``function(*inputs)`` and its ATen calls (forward + backward)."""
    module.zero_grad()
    leaves = [tensor.clone().requires_grad_() for tensor in inputs]
    with count_dispatch() as counts:
        out = function(*leaves)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves] + [p.grad.clone() for p in module.parameters()], (
        counts.total_calls
    )


@pytest.mark.parametrize("batch, length", [(2, 120), (1, 37), (3, 5)])
@pytest.mark.parametrize("masked", [True, False])
def test_self_attention_equals_torchs_module_to_float_rounding_in_fewer_calls(batch, length, masked):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(32, 4, batch_first=True).double()
    query_key, value = torch.randn(batch, length, 32).double(), torch.randn(batch, length, 32).double()
    blocked = torch.rand(length, length) > 0.6
    blocked.fill_diagonal_(False)
    mask = blocked if masked else None
    theirs, their_calls = _run(
        lambda x, v: attention(x, x, v, attn_mask=mask, need_weights=False)[0], [query_key, value], attention
    )
    additive = additive_mask(blocked, torch.float64) if masked else None
    ours, our_calls = _run(
        lambda x, v: multihead_self_attention(attention, x, v, additive), [query_key, value], attention
    )
    # float64 and close, not bit for bit: the fused query/key projection sums the weight gradients' rows in other order
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert our_calls < their_calls


def test_self_attention_refuses_modules_it_does_not_reproduce():
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="batch_first=True"):
        multihead_self_attention(nn.MultiheadAttention(8, 2), x, x)
    with pytest.raises(ValueError, match="add_bias_kv"):
        multihead_self_attention(nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True), x, x)
    with pytest.raises(ValueError, match="bool mask"):
        additive_mask(torch.zeros(3, 3), torch.float32)


def test_additive_mask_blocks_exactly_the_true_entries():
    blocked = torch.tensor([[False, True], [False, False]])
    assert torch.equal(additive_mask(blocked, torch.float64), torch.tensor([[0.0, -torch.inf], [0.0, 0.0]]).double())


def test_mlp_on_rows_equals_the_layer_by_layer_stack():
    torch.manual_seed(0)
    mlp = MLP(16, 24, 4, 3)
    x = torch.randn(2, 7, 16)

    def reference(inputs: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(mlp.layers):
            inputs = layer(inputs)
            inputs = torch.relu(inputs) if index < 2 else inputs
        return inputs

    theirs, their_calls = _run(reference, [x], mlp)
    ours, our_calls = _run(mlp, [x], mlp)
    assert ours[0].shape == (2, 7, 4)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))
    assert our_calls < their_calls


def test_context_gate_and_out_of_place_silu_keep_the_official_arithmetic():
    torch.manual_seed(0)
    block = RepVggPluXBlock(32, groups=4, norm="BN").train()
    gate = block.se_module

    def official(x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.silu(block.conv1(x) + block.conv2(x), inplace=True)
        attention = gate.conv_mask(y).flatten(2).softmax(dim=-1)
        context = torch.matmul(y.flatten(2).unsqueeze(1), attention.unsqueeze(-1))
        return gate.se_module(context.view(*y.shape[:2], 1, 1)) * y + x

    x = torch.randn(2, 32, 6, 5)
    theirs, their_calls = _run(official, [x], block)
    ours, our_calls = _run(block, [x], block)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))
    assert our_calls < their_calls


def test_deformable_attention_projects_rows_like_the_3d_linears():
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(32, num_heads=4, num_levels=2, num_points=2)
    nn.init.normal_(module.sampling_offsets.weight, std=0.1)  # non-trivial offsets, so every projection matters
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    reference = torch.rand(2, 7, 2, 2)
    padding = torch.zeros(2, 26, dtype=torch.bool)
    padding[1, -3:] = True

    def three_d(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """The module's arithmetic with each linear on the (B, N, C) tensors."""
        value = module.value_proj(value).masked_fill(padding[..., None], 0.0).view(2, 26, 4, 8)
        offsets = module.sampling_offsets(query).view(2, 7, 4, 2, 2, 2)
        weights = module.attention_weights(query).view(2, 7, 4, -1).softmax(-1).view(2, 7, 4, 2, 2)
        locations = reference[:, :, None, :, None, :] + offsets / shapes.flip(-1).float()[None, None, None, :, None, :]
        output = multi_scale_deformable_attn(value, shapes, starts, locations, weights, 64, module.backend)
        return module.output_proj(output)

    inputs = [torch.randn(2, 7, 32), torch.randn(26, 2, 32).transpose(0, 1)]  # a non-contiguous value, as in the model
    theirs, their_calls = _run(three_d, inputs, module)
    ours, our_calls = _run(lambda q, v: module(q, reference, v, shapes, starts, padding), inputs, module)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))
    assert our_calls < their_calls


def _official_interleave(angles: torch.Tensor) -> torch.Tensor:
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def test_sine_embeddings_equal_the_official_sin_of_even_and_cos_of_odd_angles():
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True
    module = PositionEmbeddingSine(num_pos_feats=16)
    not_mask = (~mask).float()
    y_embed, x_embed = not_mask.cumsum(1), not_mask.cumsum(2)
    y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
    x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
    official = torch.cat(
        (
            _official_interleave(y_embed[..., None] / module.dim_ty),
            _official_interleave(x_embed[..., None] / module.dim_tx),
        ),
        dim=3,
    ).permute(0, 3, 1, 2)
    assert torch.equal(module(mask), official)

    boxes = torch.rand(3, 6, 4)
    rates = sine_frequencies(8, 10000)
    embed = _official_interleave(boxes.unsqueeze(-1) * 2 * math.pi / rates)
    official = torch.cat((embed[..., 1:2, :], embed[..., 0:1, :], embed[..., 2:, :]), dim=-2).flatten(-2)
    assert torch.equal(get_sine_pos_embed(boxes, num_pos_feats=8), official)
    assert torch.equal(get_sine_pos_embed(boxes, num_pos_feats=8, pair_rates=rates[0::2]), official)
    with pytest.raises(ValueError, match="pair_rates must hold num_pos_feats // 2 = 4"):
        get_sine_pos_embed(boxes, num_pos_feats=8, pair_rates=rates)


def test_encoder_reference_points_equal_the_per_level_loop():
    shapes = [(4, 6), (2, 3), (1, 2)]
    ratios = torch.tensor([[[1.0, 1.0]] * 3, [[0.5, 0.75], [0.6, 1.0], [1.0, 0.5]]])
    per_level = []
    for level, (height, width) in enumerate(shapes):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, height - 0.5, height), torch.linspace(0.5, width - 0.5, width), indexing="ij"
        )
        ref_y = ref_y.reshape(-1)[None] / (ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (ratios[:, None, level, 0] * width)
        per_level.append(torch.stack((ref_x, ref_y), -1))
    official = torch.cat(per_level, 1)[:, :, None] * ratios[:, None]
    assert torch.equal(encoder_reference_points(shapes, ratios), official)
    assert torch.equal(encoder_reference_points(torch.tensor(shapes), ratios), official)


def test_valid_ratios_of_every_level_equal_the_per_level_division():
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in ((6, 7), (3, 4), (2, 2))]
    for mask, (rows, cols) in zip(masks, ((4, 5), (2, 3), (1, 2))):
        mask[1, rows:] = True
        mask[1, :, cols:] = True
    official = torch.stack(
        [
            torch.stack([(~m[:, 0, :]).sum(1).float() / m.shape[-1], (~m[:, :, 0]).sum(1).float() / m.shape[-2]], -1)
            for m in masks
        ],
        1,
    )
    assert torch.equal(valid_ratios(masks, torch.float32), official)
    assert torch.equal(valid_ratios(masks, torch.float64)[1, 0], torch.tensor([5 / 7, 4 / 6], dtype=torch.float64))


def test_proposals_of_every_level_at_once_equal_the_per_level_loop():
    shapes = [(6, 7), (3, 4), (2, 2)]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    for mask, (rows, cols) in zip(masks, ((4, 5), (2, 3), (1, 2))):
        mask[1, rows:] = True
        mask[1, :, cols:] = True
    proposals = []
    for level, mask in enumerate(masks):
        valid_size = torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1)  # (w, h) per image
        scale = valid_size.float().view(2, 1, 1, 2)
        grid_y, grid_x = torch.meshgrid(torch.arange(mask.shape[1]), torch.arange(mask.shape[2]), indexing="ij")
        centers = (torch.stack([grid_x, grid_y], -1).float().expand(2, -1, -1, -1) + 0.5) / scale
        sizes = torch.full_like(centers, 0.05 * 2.0**level)
        proposals.append(torch.cat([centers, sizes], -1).view(2, -1, 4))
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)
    official = torch.log(proposals / (1 - proposals)).masked_fill(mask_flatten.unsqueeze(-1) | ~valid, float("inf"))
    memory = torch.randn(2, mask_flatten.shape[1], 8)
    masked, logits = encoder_output_proposals(memory, mask_flatten, shapes)
    assert torch.equal(logits, official)
    assert torch.equal(masked, memory * (~mask_flatten.unsqueeze(-1)) * valid)


def test_varifocal_loss_from_shared_targets_equals_the_official_formula():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 5, generator=generator)
    onehot = torch.zeros(2, 9, 5).index_put(
        (torch.tensor([0, 1, 1]), torch.tensor([2, 0, 7]), torch.tensor([1, 4, 0])), torch.ones(())
    )
    iou = torch.rand(2, 9, generator=generator) * onehot.amax(-1)
    alpha, gamma = 0.75, 2.0
    prob = logits.sigmoid()
    target = onehot * iou.unsqueeze(-1)
    weight = (1 - alpha) * prob.pow(gamma) * (1 - onehot) + target
    official = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    assert torch.equal(varifocal_loss(logits, target, (1 - alpha) * (1 - onehot), gamma), official)


def test_cell_coordinates_equal_the_device_aranges_and_linspaces():
    shapes = [(3, 5), (1, 1), (2, 4)]
    expected = []
    for height, width in shapes:
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, height - 0.5, height), torch.linspace(0.5, width - 0.5, width), indexing="ij"
        )
        expected.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    assert torch.equal(cell_coordinates(shapes, 0.5, torch.float32, "cpu"), torch.cat(expected))
    grid_y, grid_x = torch.meshgrid(torch.arange(3.0), torch.arange(5.0), indexing="ij")
    assert torch.equal(
        cell_coordinates(shapes[:1], 0.0, torch.float64, "cpu"), torch.stack([grid_x, grid_y], -1).view(-1, 2).double()
    )


def test_box_conversions_equal_the_coordinate_by_coordinate_arithmetic():
    boxes = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(0)) + 0.1

    def xyxy_reference(b: torch.Tensor) -> torch.Tensor:
        cx, cy, w, h = b.unbind(-1)
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)

    def cxcywh_reference(b: torch.Tensor) -> torch.Tensor:
        x1, y1, x2, y2 = b.unbind(-1)
        return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)

    for ours, reference in ((box_cxcywh_to_xyxy, xyxy_reference), (box_xyxy_to_cxcywh, cxcywh_reference)):
        theirs, their_calls = _run(reference, [boxes], nn.Module())
        mine, my_calls = _run(ours, [boxes], nn.Module())
        assert all(torch.equal(a, b) for a, b in zip(theirs, mine))
        assert my_calls < their_calls
