"""The transformer's one-pass blocks (every level at once) give the values of the per-level computations they replace.

Each test builds the reference the long way, level by level or cell by cell, and also checks that the one-pass
version is cheaper in ATen calls, which is why it exists (issue #17).
"""

from __future__ import annotations

import torch

from salience_detr.layers.position_encoding import PositionEmbeddingLearned
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
