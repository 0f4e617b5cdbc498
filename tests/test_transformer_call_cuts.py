"""The transformer's one-pass blocks (every level at once) give the values of the per-level computations they replace.

Each test builds the reference the long way, level by level or cell by cell, and also checks that the one-pass
version is cheaper in ATen calls, which is why it exists (issue #17).
"""

from __future__ import annotations

import torch

from salience_detr.layers.position_encoding import PositionEmbeddingLearned
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
