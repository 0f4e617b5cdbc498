import math

import pytest
import torch

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.modeling.criterion import DEFAULT_LIMIT_RANGE, SalienceCriterion, salience_targets

ANY_SIZE = ((-1, 99999),)
EPS = 1e-3


def single_level(boxes, shape=(16, 16), padded=(128, 128), limit_range=ANY_SIZE):
    return salience_targets([torch.tensor(boxes, dtype=torch.float)], [shape], padded, limit_range)[0][0]


def test_centre_edge_midpoint_and_corner_values():
    # stride 8: cell centres at 8j + 4. Box edges sit EPS outside cells 2 and 10; its centre is cell 6.
    target = single_level([[20 - EPS, 20 - EPS, 84 + EPS, 84 + EPS]])
    assert target[6, 6].item() == pytest.approx(1.0, abs=1e-6)
    for row, col in [(6, 2), (6, 10), (2, 6), (10, 6)]:  # edge midpoints
        assert target[row, col].item() == pytest.approx(0.5, abs=1e-3)
    for row, col in [(2, 2), (2, 10), (10, 2), (10, 10)]:  # corners
        assert target[row, col].item() == pytest.approx(1 - math.sqrt(2) / 2, abs=1e-3)
    assert target[1, 6] == 0 and target[6, 11] == 0 and target[0, 0] == 0  # outside
    assert ((target > 0).nonzero()[:, 0].unique() == torch.arange(2, 11)).all()


def test_strides_follow_padded_size_per_axis():
    # 8 x 4 map of a 64 x 64 padded image: stride 8 in y, 16 in x; box centre (24, 36) is the cell (4, 1)
    target = single_level([[8 - EPS, 20 - EPS, 40 + EPS, 52 + EPS]], shape=(8, 4), padded=(64, 64))
    assert target[4, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert target.argmax().item() == 4 * 4 + 1


def reference_target(x, y, boxes, low, high):
    """Brute-force per-cell rule of docs/model.md#salience-loss, in plain Python."""
    best, matched = 0.0, False
    for x1, y1, x2, y2 in boxes:
        l, t, r, b = x - x1, y - y1, x2 - x, y2 - y
        if min(l, t, r, b) <= 0:
            continue
        matched |= low < max(l, t, r, b) <= high
        best = max(best, 1 - math.sqrt(((l - r) / (l + r)) ** 2 + ((t - b) / (t + b)) ** 2) / 2)
    return best if matched else 0.0


def test_level_assignment_matches_brute_force_rule():
    boxes = [[30, 40, 90, 75], [10, 100, 250, 250], [0, 0, 512, 480], [140, 20, 150, 60], [300, 300, 440, 420]]
    shapes = [(32, 32), (16, 16), (8, 8), (4, 4)]
    targets = salience_targets([torch.tensor(boxes, dtype=torch.float)], shapes, (512, 512), DEFAULT_LIMIT_RANGE)
    for (height, width), (low, high), target in zip(shapes, DEFAULT_LIMIT_RANGE, targets):
        stride = 512 / height
        expected = torch.tensor(
            [
                [reference_target((j + 0.5) * stride, (i + 0.5) * stride, boxes, low, high) for j in range(width)]
                for i in range(height)
            ]
        )
        torch.testing.assert_close(target[0], expected, atol=1e-5, rtol=1e-5)
    assert all((t > 0).any() for t in targets)  # every level got positives from some box


def test_small_box_is_positive_only_on_the_fine_level():
    box = [[100 - EPS, 100 - EPS, 140 + EPS, 140 + EPS]]  # 40 px: max(l,t,r,b) <= 40 everywhere inside
    shapes = [(32, 32), (16, 16), (8, 8), (4, 4)]
    targets = salience_targets([torch.tensor(box)], shapes, (256, 256), DEFAULT_LIMIT_RANGE)
    assert (targets[0] > 0).any()
    assert all(not (t > 0).any() for t in targets[1:])


def test_max_runs_over_all_containing_boxes():
    # a small box (level-matched on the fine level) inside a big one (not matched there): the cell at the big
    # box's centre takes the big box's confidence 1, although only the small box matches the level.
    big = [4 - EPS, 4 - EPS, 196 + EPS, 196 + EPS]  # centre 100; too large for (-1, 64]
    small = [76 - EPS, 76 - EPS, 108 + EPS, 108 + EPS]  # 32 px, centre 92
    target = single_level([big, small], shape=(25, 25), padded=(200, 200), limit_range=DEFAULT_LIMIT_RANGE)
    small_only = single_level([small], shape=(25, 25), padded=(200, 200), limit_range=DEFAULT_LIMIT_RANGE)
    assert target[12, 12].item() == pytest.approx(1.0, abs=1e-6)  # cell centre (100, 100)
    assert small_only[12, 12].item() < 0.8
    big_only = single_level([big], shape=(25, 25), padded=(200, 200), limit_range=DEFAULT_LIMIT_RANGE)
    assert not (big_only > 0).any()  # the big box alone makes no positive on this level
    assert ((target > 0) == (small_only > 0)).all()


def test_images_without_boxes_and_batches():
    targets = salience_targets([torch.zeros(0, 4), torch.tensor([[8.0, 8.0, 40.0, 40.0]])], [(8, 8)], (64, 64))
    assert targets[0].shape == (2, 8, 8)
    assert not (targets[0][0] > 0).any() and (targets[0][1] > 0).any()


def test_loss_value_and_gradient_through_probability():
    gen = torch.Generator().manual_seed(0)
    boxes = [torch.tensor([[8.0, 8.0, 60.0, 40.0]]), torch.tensor([[0.0, 0.0, 30.0, 30.0], [20.0, 30.0, 64.0, 64.0]])]
    salience = [torch.randn(2, 1, 8, 8, generator=gen).requires_grad_(), torch.randn(2, 1, 4, 4, generator=gen)]
    loss = SalienceCriterion()(salience, boxes, (64, 64))["loss_salience"]

    target = torch.cat([t.flatten(1) for t in salience_targets(boxes, [(8, 8), (4, 4)], (64, 64))], dim=1)
    logits = torch.cat([s.flatten(1) for s in salience], dim=1)
    prob = logits.sigmoid()
    bce = -(target * torch.log(prob) + (1 - target) * torch.log(1 - prob))
    weight = 0.75 * prob**2 * (1 - target) + 0.25 * target * (1 - prob) ** 2
    num_pos = (target > 0).sum()
    assert num_pos > 0
    expected = 2.0 * (bce * weight).sum() / num_pos
    torch.testing.assert_close(loss, expected)

    (grad,) = torch.autograd.grad(loss, salience[0], retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, salience[0], retain_graph=True)
    torch.testing.assert_close(grad, expected_grad)
    detached = 2.0 * (bce * weight.detach()).sum() / num_pos
    (detached_grad,) = torch.autograd.grad(detached, salience[0])
    assert not torch.allclose(grad, detached_grad)


def test_no_positive_cells_normalises_by_one():
    salience = [torch.zeros(1, 1, 4, 4)]
    loss = SalienceCriterion(weight=1.0)(salience, [torch.zeros(0, 4)], (32, 32))["loss_salience"]
    # every cell: BCE(0, 0) = log 2, weight 0.75 * 0.5^2
    assert loss.item() == pytest.approx(16 * math.log(2) * 0.75 * 0.25, rel=1e-5)


def per_image_targets(boxes_per_image, shapes, padded_size, limit_range=DEFAULT_LIMIT_RANGE):
    """The per-level, per-image loop the batched targets replace (each image's boxes on their own)."""
    targets = []
    for (height, width), (low, high) in zip(shapes, limit_range):
        ys = (torch.arange(height, dtype=torch.float32) + 0.5) * (padded_size[0] / height)
        xs = (torch.arange(width, dtype=torch.float32) + 0.5) * (padded_size[1] / width)
        ys, xs = torch.meshgrid(ys, xs, indexing="ij")
        level = []
        for boxes in boxes_per_image:
            if not len(boxes):
                level.append(torch.zeros_like(xs))
                continue
            left, top = xs[..., None] - boxes[:, 0], ys[..., None] - boxes[:, 1]
            right, bottom = boxes[:, 2] - xs[..., None], boxes[:, 3] - ys[..., None]
            distances = torch.stack([left, top, right, bottom], dim=-1)
            inside = distances.amin(dim=-1) > 0
            match = inside & (distances.amax(dim=-1) > low) & (distances.amax(dim=-1) <= high)
            delta = torch.sqrt(((left - right) / (left + right)) ** 2 + ((top - bottom) / (top + bottom)) ** 2)
            centreness = torch.where(inside, 1 - delta / 2, torch.zeros_like(left))
            level.append(torch.where(match.any(dim=-1), centreness.amax(dim=-1), torch.zeros_like(xs)))
        targets.append(torch.stack(level))
    return targets


def test_batched_targets_equal_the_per_image_loop_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    corners = torch.rand(3, 7, 2, 2, generator=gen).sort(dim=2).values * torch.tensor([100.0, 70.0])
    boxes = [corners[0].flatten(1), torch.zeros(0, 4), corners[2, :3].flatten(1)]  # 7 boxes, none, 3 boxes
    shapes, padded = [(9, 13), (5, 7), (3, 4), (2, 2)], (70, 100)  # odd strides, not powers of two
    batched = salience_targets(boxes, shapes, padded, ((-1, 20), (20, 40), (40, 60), (60, 99999)))
    looped = per_image_targets(boxes, shapes, padded, ((-1, 20), (20, 40), (40, 60), (60, 99999)))
    assert all(torch.equal(b, l) for b, l in zip(batched, looped))
    assert sum(bool((level > 0).any()) for level in batched) >= 3 and not any((level[1] > 0).any() for level in batched)
