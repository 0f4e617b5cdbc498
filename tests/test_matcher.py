import pytest
import torch

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.modeling.matcher import HungarianMatcher


def target(labels, boxes):
    return {"labels": torch.tensor(labels, dtype=torch.long), "boxes": torch.tensor(boxes, dtype=torch.float)}


def confident_logits(labels, num_classes):
    logits = torch.full((len(labels), num_classes), -8.0)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = 8.0
    return logits


def test_perfect_predictions_match_identity():
    boxes = [[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.3, 0.2], [0.8, 0.3, 0.2, 0.4], [0.3, 0.7, 0.2, 0.2]]
    labels = [3, 1, 4, 1]
    pred_logits = confident_logits(labels, 5)[None]
    pred_boxes = torch.tensor(boxes)[None]
    ((query_idx, gt_idx),) = HungarianMatcher()(pred_logits, pred_boxes, [target(labels, boxes)])
    assert query_idx.tolist() == [0, 1, 2, 3] and gt_idx.tolist() == [0, 1, 2, 3]
    assert query_idx.dtype == torch.int64 and gt_idx.dtype == torch.int64


def test_permuted_predictions_recover_permutation_per_image():
    gen = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher()
    gt_boxes = [torch.rand(n, 2, generator=gen) * 0.6 + 0.2 for n in (5, 3)]
    gt_boxes = [torch.cat([c, torch.full_like(c, 0.1)], dim=1) for c in gt_boxes]
    gt_labels = [torch.randint(0, 7, (n,), generator=gen) for n in (5, 3)]
    num_queries = 8
    pred_boxes = torch.rand(2, num_queries, 4, generator=gen) * 0.05 + 0.9  # far-away junk
    pred_logits = torch.full((2, num_queries, 7), -8.0)
    placements = [torch.tensor([6, 2, 0, 7, 4]), torch.tensor([1, 5, 3])]
    for image, slots in enumerate(placements):
        pred_boxes[image, slots] = gt_boxes[image]
        pred_logits[image, slots, gt_labels[image]] = 8.0
    targets = [{"labels": l, "boxes": b} for l, b in zip(gt_labels, gt_boxes)]
    for image, (query_idx, gt_idx) in enumerate(matcher(pred_logits, pred_boxes, targets)):
        assert query_idx.tolist() == sorted(query_idx.tolist())
        assert dict(zip(gt_idx.tolist(), query_idx.tolist())) == dict(enumerate(placements[image].tolist()))


def test_class_cost_breaks_box_tie():
    boxes = [[0.5, 0.5, 0.2, 0.2]]
    pred_boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])[None]
    pred_logits = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]])
    ((query_idx, gt_idx),) = HungarianMatcher()(pred_logits, pred_boxes, [target([1], boxes)])
    assert query_idx.tolist() == [1] and gt_idx.tolist() == [0]


def test_class_cost_formula():
    matcher = HungarianMatcher()
    logits = torch.tensor([[0.3, -1.2]])
    p = torch.sigmoid(logits[0, 1])
    expected = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-6) - 0.75 * p**2 * -torch.log(1 - p + 1e-6)
    torch.testing.assert_close(matcher.class_cost(logits, torch.tensor([1]))[0, 0], expected)


def test_empty_targets_give_empty_indices():
    matcher = HungarianMatcher()
    pred_logits, pred_boxes = torch.randn(2, 6, 4), torch.rand(2, 6, 4)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    indices = matcher(pred_logits, pred_boxes, [empty, empty])
    assert all(q.numel() == 0 and g.numel() == 0 and q.dtype == torch.int64 for q, g in indices)
    # one image with boxes, one without
    indices = matcher(pred_logits, pred_boxes, [target([2], [[0.5, 0.5, 0.2, 0.2]]), empty])
    assert len(indices[0][0]) == 1 and len(indices[1][0]) == 0


def test_non_finite_predictions_are_refused():
    pred_boxes = torch.rand(1, 3, 4)
    pred_boxes[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        HungarianMatcher()(torch.randn(1, 3, 4), pred_boxes, [target([0], [[0.5, 0.5, 0.2, 0.2]])])
