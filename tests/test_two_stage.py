import math

import torch

from salience_detr.layers.levels import level_start_index
from salience_detr.modeling.two_stage import encoder_output_proposals, grid_nms, select_proposals


def level_layout(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    return spatial_shapes, level_start_index(spatial_shapes)


def test_anchor_sizes_centres_and_validity_per_level():
    shapes = [(8, 10), (4, 5), (2, 3), (1, 2)]
    spatial_shapes, level_start_index = level_layout(shapes)
    num_tokens = int(spatial_shapes.prod(1).sum())
    memory = torch.randn(1, num_tokens, 6)
    mask = torch.zeros(1, num_tokens, dtype=torch.bool)
    masked, logits = encoder_output_proposals(memory, mask, spatial_shapes)
    boxes = logits.sigmoid()
    for level, (start, (h, w)) in enumerate(zip(level_start_index.tolist(), shapes)):
        level_boxes = boxes[0, start : start + h * w].view(h, w, 4)
        level_logits = logits[0, start : start + h * w].view(h, w, 4)
        finite = torch.isfinite(level_logits).all(-1)
        side = 0.05 * 2**level
        torch.testing.assert_close(level_boxes[finite][:, 2:], torch.full_like(level_boxes[finite][:, 2:], side))
        # centre of cell (i, j) = ((j + 0.5) / w, (i + 0.5) / h), checked on a finite anchor
        i, j = [int(v) for v in finite.nonzero()[0]]
        torch.testing.assert_close(level_boxes[i, j, :2], torch.tensor([(j + 0.5) / w, (i + 0.5) / h]))
        expected_valid = torch.zeros(h, w, dtype=torch.bool)
        cx = (torch.arange(w) + 0.5) / w
        cy = (torch.arange(h) + 0.5) / h
        inside = lambda v: (v > 0.01) & (v < 0.99)  # noqa: E731
        expected_valid = inside(cy)[:, None] & inside(cx)[None, :] & (0.01 < side < 0.99)
        assert torch.equal(finite, expected_valid)
        assert torch.all(level_logits[~expected_valid] == math.inf)
    valid = torch.isfinite(logits).all(-1, keepdim=True)
    torch.testing.assert_close(masked, memory * valid)


def test_padding_uses_valid_size_and_is_infinite():
    spatial_shapes, _ = level_layout([(4, 6)])
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, :, 4:] = True  # 4 valid columns
    mask[:, 3:, :] = True  # 3 valid rows
    memory = torch.ones(1, 24, 3)
    masked, logits = encoder_output_proposals(memory, mask.flatten(1), spatial_shapes)
    logits = logits.view(4, 6, 4)
    assert torch.all(torch.isinf(logits[mask[0]]))
    torch.testing.assert_close(logits[1, 2, :2].sigmoid(), torch.tensor([2.5 / 4, 1.5 / 3]))
    assert torch.all(masked.view(4, 6, 3)[mask[0]] == 0)


def test_grid_nms_drops_direct_neighbours_keeps_diagonal():
    spatial_shapes, level_start_index = level_layout([(5, 5)])

    def flat(y, x):
        return y * 5 + x

    tokens = torch.tensor([[flat(2, 2), flat(2, 3), flat(3, 3), flat(1, 2), flat(0, 0)]])
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = grid_nms(scores, tokens, spatial_shapes, level_start_index, max_keep=3, num_tokens=25)
    # (2,3) and (1,2) are direct neighbours of (2,2); (3,3) is diagonal to (2,2); (0,0) is far
    assert kept.tolist() == [[flat(2, 2), flat(3, 3), flat(0, 0)]]


def test_grid_nms_groups_by_level_and_image_and_fills_up_with_the_suppressed():
    spatial_shapes, level_start_index = level_layout([(3, 3), (3, 3)])
    # token 4 is the centre of level 0; token 13 the centre of level 1: same grid position, different level
    tokens = torch.tensor([[4, 13, 5], [4, 5, 3]])
    scores = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    kept = grid_nms(scores, tokens, spatial_shapes, level_start_index, max_keep=10, num_tokens=18)
    # image 0 keeps 4 and 13 (different levels), drops 5; image 1 keeps only 4; the suppressed follow in score order
    assert kept.tolist() == [[4, 13, 5], [4, 5, 3]]
    kept = grid_nms(scores, tokens, spatial_shapes, level_start_index, max_keep=2, num_tokens=18)
    assert kept.tolist() == [[4, 13], [4, 5]]
    kept = grid_nms(scores[:1], tokens[:1], spatial_shapes, level_start_index, max_keep=1, num_tokens=18)
    assert kept.tolist() == [[4]]


def test_select_proposals_gathers_in_score_order_with_fewer_than_requested():
    spatial_shapes, level_start_index = level_layout([(4, 4), (2, 2)])
    enc_class = torch.randn(2, 20, 3)
    enc_coord = torch.rand(2, 20, 4)
    index, cls, coord = select_proposals(enc_class, enc_coord, spatial_shapes, level_start_index, num_queries=900)
    assert index.shape[1] == 20  # Q' = min(900, N): the survivors, then the suppressed tokens
    for b in range(2):
        torch.testing.assert_close(cls[b], enc_class[b, index[b]])
        torch.testing.assert_close(coord[b], enc_coord[b, index[b]])
        top = cls[b].max(-1)[0]
        assert int((top[:-1] < top[1:]).sum()) <= 1  # two runs in score order: the survivors, the suppressed
