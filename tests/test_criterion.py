import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torchvision.ops import box_convert, box_iou, generalized_box_iou

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.modeling.criterion import HybridSetCriterion, denoising_indices
from salience_detr.modeling.matcher import HungarianMatcher

NUM_CLASSES = 5


def make_criterion():
    return HybridSetCriterion(NUM_CLASSES, HungarianMatcher())


def make_targets():
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])},
    ]


def random_set(batch, queries, gen):
    logits = torch.randn(batch, queries, NUM_CLASSES, generator=gen, requires_grad=True)
    boxes = torch.rand(batch, queries, 4, generator=gen) * 0.5 + 0.2
    return {"pred_logits": logits, "pred_boxes": boxes.requires_grad_()}


def full_outputs(num_layers=6, queries=10, num_groups=3, max_gt=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers = [random_set(2, queries, gen) for _ in range(num_layers)]
    dn_layers = [random_set(2, 2 * max_gt * num_groups, gen) for _ in range(num_layers)]
    outputs = dict(layers[-1], aux_outputs=layers[:-1], enc_outputs=random_set(2, queries, gen))
    outputs["dn_outputs"] = dict(
        dn_layers[-1], aux_outputs=dn_layers[:-1], denoising_groups=num_groups, max_gt_num_per_image=max_gt
    )
    return outputs


def expected_keys(num_layers=6):
    suffixes = [""] + [f"_{i}" for i in range(num_layers - 1)] + ["_enc", "_dn"]
    suffixes += [f"_dn_{i}" for i in range(num_layers - 1)]
    return {f"loss_{kind}{suffix}" for kind in ("class", "bbox", "giou") for suffix in suffixes}


def test_all_39_terms_finite_and_differentiable():
    outputs = full_outputs()
    losses = make_criterion()(outputs, make_targets())
    assert set(losses) == expected_keys() and len(losses) == 39
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    for output_set in [outputs, outputs["enc_outputs"], outputs["dn_outputs"], *outputs["aux_outputs"]]:
        assert output_set["pred_logits"].grad is not None and output_set["pred_boxes"].grad is not None


def test_perfect_predictions_give_zero_box_losses():
    targets = make_targets()
    logits = torch.full((2, 4, NUM_CLASSES), -6.0)
    boxes = torch.full((2, 4, 4), 0.9)
    slots = [[2, 0], [3]]
    for image, (target, image_slots) in enumerate(zip(targets, slots)):
        boxes[image, image_slots] = target["boxes"]
        logits[image, image_slots, target["labels"]] = 6.0
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    losses, indices = make_criterion()(outputs, targets, return_indices=True)
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    assert losses["loss_bbox"].abs() < 1e-6 and losses["loss_giou"].abs() < 1e-6
    assert losses["loss_class"] < 0.05
    assert [dict(zip(g.tolist(), q.tolist())) for q, g in indices] == [{0: 2, 1: 0}, {0: 3}]


def softplus(x):
    return math.log1p(math.exp(x))


def test_class_and_box_losses_by_hand():
    # GT (0.3, 0.3)-(0.7, 0.7); query 0 covers (0.3, 0.4)-(0.7, 0.6): IoU 0.5, GIoU 0.5, L1 0.2; query 1 is far away.
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    logits = torch.tensor([[[1.0, -2.0], [-1.0, 0.5]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    criterion = HybridSetCriterion(2, HungarianMatcher())
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    # matched entry: BCE(1.0, target 0.5) weighted by the IoU 0.5; others: BCE(x, 0) * 0.75 * sigmoid(x)^2
    expected_class = 0.5 * (softplus(1.0) - 0.5)
    expected_class += sum(0.75 * sigmoid(x) ** 2 * softplus(x) for x in (-2.0, -1.0, 0.5))
    assert losses["loss_class"].item() == pytest.approx(expected_class, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5 * 0.2, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2 * 0.5, rel=1e-5)


def test_class_loss_weight_uses_detached_probability():
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    logits = torch.tensor([[[1.0, -2.0], [-1.0, 0.5]]], requires_grad=True)
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.1, 0.1, 0.05, 0.05]]])
    HybridSetCriterion(2, HungarianMatcher())({"pred_logits": logits, "pred_boxes": boxes}, targets)[
        "loss_class"
    ].backward()
    # unmatched entry with weight w = 0.75 p^2 held constant: d/dx [w * softplus(x)] = w * p
    p = torch.sigmoid(torch.tensor(0.5))
    torch.testing.assert_close(logits.grad[0, 1, 1], 0.75 * p**2 * p)


def test_denoising_fixed_assignment():
    indices = denoising_indices([2, 0, 1], num_groups=3, group_size=4)
    assert indices[0][0].tolist() == [0, 1, 4, 5, 8, 9] and indices[0][1].tolist() == [0, 1, 0, 1, 0, 1]
    assert indices[1][0].size == 0 and indices[1][1].size == 0 and indices[1][0].dtype == np.int64
    assert indices[2][0].tolist() == [0, 4, 8] and indices[2][1].tolist() == [0, 0, 0]


def test_denoising_losses_use_positive_slots_and_group_normaliser():
    targets = make_targets()
    num_groups, max_gt = 3, 2
    outputs = full_outputs(num_layers=1, num_groups=num_groups, max_gt=max_gt)
    dn_boxes = torch.rand(2, 2 * max_gt * num_groups, 4) * 0.5 + 0.2
    for image, target in enumerate(targets):
        for g in range(num_groups):
            start = g * 2 * max_gt
            shifted = target["boxes"].clone()
            shifted[:, 0] += 0.1  # every positive copy off by 0.1 in cx
            dn_boxes[image, start : start + len(shifted)] = shifted
    outputs["dn_outputs"]["pred_boxes"] = dn_boxes
    losses = make_criterion()(outputs, targets)
    # sum of L1 = 0.1 * (3 boxes * 3 groups); normaliser 3 boxes * 3 groups; weight 5
    assert losses["loss_bbox_dn"].item() == pytest.approx(5 * 0.1, rel=1e-4)


def test_inconsistent_dn_metadata_is_refused():
    outputs = full_outputs(num_layers=2, num_groups=3, max_gt=2)
    outputs["dn_outputs"]["max_gt_num_per_image"] = 4  # 2 * n_max passed by mistake
    with pytest.raises(ValueError, match="max_gt_num_per_image"):
        make_criterion()(outputs, make_targets())


def test_images_without_boxes():
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    outputs = full_outputs(num_layers=2, num_groups=1, max_gt=0)
    losses = make_criterion()(outputs, [empty, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0 and losses["loss_class"] > 0


def test_out_of_range_labels_are_refused():
    """The criterion reads no label value (the meta-arch checks the host copies); indexing still refuses them."""
    targets = make_targets()
    targets[1]["labels"] = torch.tensor([NUM_CLASSES])
    with pytest.raises(IndexError, match=f"index {NUM_CLASSES} is out of bounds"):
        make_criterion()(full_outputs(num_layers=1), targets)


def reference_set_losses(outputs, targets, indices, num_boxes, alpha=0.25, gamma=2.0):
    """The per-set loop the stacked criterion replaces: one set, its own IoU matrices (diagonals taken)."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    batch_idx = torch.cat([torch.full_like(query, i) for i, (query, _) in enumerate(indices)])
    query_idx = torch.cat([query for query, _ in indices])
    matched = boxes[batch_idx, query_idx]
    target_boxes = torch.cat([t["boxes"][gt] for t, (_, gt) in zip(targets, indices)])
    labels = torch.cat([t["labels"][gt] for t, (_, gt) in zip(targets, indices)])
    matched_xyxy, target_xyxy = box_convert(matched, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
    iou = torch.zeros(logits.shape[:2])
    iou[batch_idx, query_idx] = torch.diag(box_iou(matched_xyxy, target_xyxy)).detach()
    onehot = torch.zeros_like(logits)
    onehot[batch_idx, query_idx, labels] = 1.0
    target = onehot * iou.unsqueeze(-1)
    weight = (1 - alpha) * logits.sigmoid().detach().pow(gamma) * (1 - onehot) + target
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none")
    return {
        "loss_class": bce.sum() / num_boxes,
        "loss_bbox": F.l1_loss(matched, target_boxes, reduction="sum") / num_boxes,
        "loss_giou": (1 - torch.diag(generalized_box_iou(matched_xyxy, target_xyxy))).sum() / num_boxes,
    }


def test_every_set_scored_at_once_equals_the_per_set_loop():
    targets, criterion = make_targets(), make_criterion()
    outputs = full_outputs(num_layers=3)
    losses = criterion(outputs, targets)
    sum(losses.values()).backward()
    stacked_grads = [t.grad.clone() for t in _leaves(outputs)]
    for leaf in _leaves(outputs):
        leaf.grad = None

    matched_sets = [outputs, *outputs["aux_outputs"], outputs["enc_outputs"]]
    all_indices = criterion.matcher.match_sets([(o["pred_logits"], o["pred_boxes"]) for o in matched_sets], targets)
    dn_indices = [tuple(map(torch.as_tensor, pair)) for pair in denoising_indices([2, 1], num_groups=3, group_size=4)]
    scored = [(s, i, 3.0, x) for s, i, x in zip(matched_sets, all_indices, ["", "_0", "_1", "_enc"])]
    dn_sets = [outputs["dn_outputs"], *outputs["dn_outputs"]["aux_outputs"]]
    scored += [(s, dn_indices, 9.0, x) for s, x in zip(dn_sets, ["_dn", "_dn_0", "_dn_1"])]
    expected = {}
    for output_set, indices, num_boxes, suffix in scored:
        for name, value in reference_set_losses(output_set, targets, indices, num_boxes).items():
            expected[f"{name}{suffix}"] = value * criterion.loss_weights[f"{name}{suffix}"]
    assert list(losses) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-6, atol=1e-7, msg=name)
    sum(expected.values()).backward()
    for stacked, looped in zip(stacked_grads, [t.grad for t in _leaves(outputs)]):
        # one class term over the concatenated sets: the CPU's vectorised sigmoid may round a buffer's tail apart
        torch.testing.assert_close(stacked, looped, rtol=1e-6, atol=1e-7)


def _leaves(outputs):
    sets = [outputs, outputs["enc_outputs"], outputs["dn_outputs"], *outputs["aux_outputs"]]
    sets += outputs["dn_outputs"]["aux_outputs"]
    return [s[key] for s in sets for key in ("pred_logits", "pred_boxes")]
