"""The transformer's one-pass blocks (every level at once) give the values of the per-level computations they replace.

Each test builds the reference the long way, level by level or cell by cell, and also checks that the one-pass
version is cheaper in ATen calls, which is why it exists (issue #17).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_transformer import make_inputs, make_transformer

from salience_detr.layers.levels import flatten_levels
from salience_detr.layers.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from salience_detr.modeling.decoder import SalienceDecoder, SalienceDecoderLayer
from salience_detr.utils.dispatch_count import count_dispatch


def test_learned_embedding_of_every_cell_of_every_level_in_one_pass():
    torch.manual_seed(0)
    module = PositionEmbeddingLearned(num_embeddings=5, num_pos_feats=3)
    shapes = [(4, 6), (2, 3), (7, 1)]  # the widest and the tallest level exceed the table: clamped to row 4
    col, row = module.col_embed.weight, module.row_embed.weight
    expected = torch.stack(
        [torch.cat((col[min(x, 4)], row[min(y, 4)])) for h, w in shapes for y in range(h) for x in range(w)]
    )
    with count_dispatch() as counts:
        cells = module.cells(shapes)
    assert torch.equal(cells, expected)
    assert counts.total_calls <= 5  # two host index transfers, two lookups, one concatenation, for any level count
    assert torch.equal(module(4, 6), expected[:24].view(4, 6, 6).permute(2, 0, 1))


def _calls_and_gradients(function, inputs: torch.Tensor, module: torch.nn.Module):
    module.zero_grad()
    leaf = inputs.clone().requires_grad_()
    with count_dispatch() as counts:
        out = function(leaf)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    return [out.detach(), leaf.grad] + [p.grad.clone() for p in module.parameters()], counts.total_calls


def test_class_logits_of_every_decoder_layer_equal_each_layers_linear_head():
    torch.manual_seed(0)
    layer = SalienceDecoderLayer(embed_dim=16, ffn_dim=32, num_heads=4, num_levels=2, num_points=2)
    decoder = SalienceDecoder(layer, num_layers=3, num_classes=5).double()
    heads = decoder.class_head
    normed = torch.randn(3, 2, 7, 16, dtype=torch.float64)
    ours, our_calls = _calls_and_gradients(decoder.class_logits, normed, heads)
    theirs, their_calls = _calls_and_gradients(
        lambda x: torch.stack([head(part) for head, part in zip(heads, x)]), normed, heads
    )
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)  # float64: one batched matmul
    assert our_calls < their_calls


def _level_masks() -> list[torch.Tensor]:
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in [(6, 9), (3, 5), (2, 3)]]
    for mask in masks:  # second image padded right and below, first unpadded
        mask[1, -1:] = True
        mask[1, :, mask.shape[-1] // 2 + 1 :] = True
    return masks


def test_sine_embedding_of_every_level_in_one_pass_equals_the_per_level_maps():
    module = PositionEmbeddingSine(num_pos_feats=8)
    masks = _level_masks()
    official = []  # the official per-level arithmetic: cumsum, normalise, sin of even and cos of odd angles
    for mask in masks:
        not_mask = (~mask).float()
        y, x = not_mask.cumsum(1), not_mask.cumsum(2)
        y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * 2 * math.pi
        x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * 2 * math.pi
        pos_x, pos_y = x[..., None] / module.dim_tx, y[..., None] / module.dim_ty
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        official.append(torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2))
    with count_dispatch() as counts:
        flat = module.flat(masks)
    assert torch.equal(flat, flatten_levels(official))
    assert counts.total_calls < 26 * len(masks)  # 26 calls per level when each level was embedded on its own
    assert all(torch.equal(module(mask), expected) for mask, expected in zip(masks, official))


def test_transformer_takes_flattened_position_embeddings_and_checks_their_length():
    transformer = make_transformer().eval()
    features, masks, pos = make_inputs()
    with torch.no_grad():
        per_level = transformer(features, masks, pos)
        flat = transformer(features, masks, flatten_levels(pos))
    assert torch.equal(per_level.pred_boxes, flat.pred_boxes) and torch.equal(per_level.pred_logits, flat.pred_logits)
    with pytest.raises(ValueError, match="PositionEmbeddingSine.flat"):
        transformer(features, masks, flatten_levels(pos)[:, 1:])
