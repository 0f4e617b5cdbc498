"""The RoI head's training step without host syncs: a host-known row count (padding rows marked invalid), crops
pooled on every level without a per-level count, fixed-size positives with weights, one shared normaliser."""

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes
from detectron2.structures.boxes import matched_pairwise_iou
from test_loss_curve import TINY_CONFIG, fixed_batches
from test_roi_refine import head_inputs, random_boxes, small_head
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou

from salience_detr.modeling import criterion as criterion_module
from salience_detr.modeling import meta_arch
from salience_detr.modeling.roi_refine import head as head_module
from salience_detr.modeling.roi_refine import matched_mask, positive_targets, selected_rows
from salience_detr.modeling.roi_refine.layers import pool_rows, roi_pooler
from salience_detr.modeling.roi_refine.losses import roi_box_losses
from salience_detr.utils.dispatch_count import count_dispatch


def training_case():
    """Two images (2 and 0 boxes), 8 queries, top-3 refined; one match is in the top 3, so one row is padding."""
    head = small_head(num_rois=3, positive_iou=0.3, iou_beta=0.5)
    logits, _, inputs = head_inputs([(96, 128), (64, 80)], (96, 128), num_queries=8)
    gt = random_boxes(1, 2)[0]
    boxes = random_boxes(2, 8)
    boxes[0] = gt[torch.arange(8) % 2] + 0.004 * torch.arange(8)[:, None]  # near the objects: more positives
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": gt},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    top = logits[0].sigmoid().amax(-1).argsort(descending=True)
    rest = top[3:]
    indices = [(torch.stack([top[0], rest[0]]), torch.tensor([1, 0])), (torch.zeros(0, dtype=torch.long),) * 2]
    return head, logits, boxes, inputs, targets, indices


def test_selected_rows_pad_with_unselected_queries_after_the_selected_ones():
    selected = torch.tensor([[False, True, False, True], [True, False, False, False]])
    batch_index, query_index, valid = selected_rows(selected, max_rows=5)
    assert batch_index.tolist() == [0, 0, 1, 0, 0] and query_index.tolist() == [1, 3, 0, 0, 2]
    assert valid.tolist() == [True, True, True, False, False]
    exact = selected_rows(selected)
    assert all(torch.equal(a, b[:3]) for a, b in zip(exact, (batch_index, query_index, valid)))


def test_padded_rows_pool_the_same_crops_bit_for_bit():
    generator = torch.Generator().manual_seed(3)
    features = [torch.randn(2, 4, 256 // s, 320 // s, generator=generator) for s in (8, 16, 32, 64)]
    sizes = torch.rand(2, 30, 2, generator=generator) * torch.tensor([300.0, 240.0]) + 2
    corners = torch.rand(2, 30, 2, generator=generator) * (torch.tensor([320.0, 256.0]) - sizes)
    rois = torch.cat([corners, corners + sizes], dim=-1)
    selected = torch.rand(2, 30, generator=generator) < 0.5
    pooler = roi_pooler((8, 16, 32, 64), 7, 0, 112, 4)
    exact_batch, exact_query, _ = selected_rows(selected)
    batch_index, query_index, valid = selected_rows(selected, max_rows=len(exact_batch) + 7)
    exact = pool_rows(pooler, features, rois[exact_batch, exact_query], exact_batch)
    padded = pool_rows(pooler, features, rois[batch_index, query_index], batch_index)
    assert (~valid).sum() == 7 and torch.equal(padded[valid], exact)
    expected = pooler(features, [Boxes(image_rois[mask]) for image_rois, mask in zip(rois, selected)])
    assert torch.equal(exact, expected)


def test_a_training_step_of_the_head_reads_nothing_back_and_equals_the_counted_rows():
    head, logits, boxes, inputs, targets, indices = training_case()
    matched = matched_mask(indices, (2, 8), boxes.device)
    with count_dispatch(sync_sites=True) as counts:
        refinement = head(logits, boxes, inputs, matched, max_extra=2)
        losses = head.losses(refinement, targets, indices, num_boxes=2.0, check_matched=False)
        sum(losses.values()).backward()
    assert counts.total_syncs == 0, counts.table(0)
    assert refinement.valid.tolist().count(False) == 1  # the match in the top 3 left one padding row
    counted = head(logits, boxes, inputs, matched)  # rows counted with one host read: no padding
    assert counted.valid.all() and len(counted.valid) == len(refinement.valid) - 1
    assert torch.allclose(refinement.boxes, counted.boxes, atol=1e-6)
    assert torch.allclose(refinement.logits, counted.logits, atol=1e-6)
    unrefined = torch.ones_like(matched)
    unrefined[counted.batch_index, counted.query_index] = False  # the padding row's query among them
    assert torch.equal(refinement.boxes[unrefined], boxes[unrefined])
    assert torch.equal(refinement.logits[unrefined], logits[unrefined])
    for name, value in head.losses(counted, targets, indices, num_boxes=2.0).items():
        assert torch.allclose(losses[name], value, atol=1e-6), name


def compact_losses(refinement, targets, indices, positive_iou, num_boxes):
    """The positives selected with a boolean mask, torchvision's GIoU and detectron2's IoU: the reference."""
    rows, target_boxes, weights = positive_targets(refinement, targets, indices, positive_iou)
    rows, target_boxes = rows[weights > 0], target_boxes[weights > 0]
    refined = refinement.refined_boxes[rows]
    refined_xyxy, target_xyxy = box_convert(refined, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
    iou = matched_pairwise_iou(Boxes(refined_xyxy.detach()), Boxes(target_xyxy))
    bce = F.binary_cross_entropy_with_logits(refinement.iou_logits[rows], iou, reduction="sum")
    return {
        "loss_roi_bbox": F.l1_loss(refined, target_boxes, reduction="sum") / num_boxes,
        "loss_roi_giou": (1 - generalized_box_iou(refined_xyxy, target_xyxy).diagonal()).sum() / num_boxes,
        "loss_roi_iou": bce / num_boxes,
    }


def test_weighted_fixed_rows_give_the_losses_and_gradients_of_the_positives_alone():
    head, logits, boxes, inputs, targets, indices = training_case()
    refinement = head(logits, boxes, inputs, matched_mask(indices, (2, 8), boxes.device), max_extra=2)
    rows, target_boxes, weights = positive_targets(refinement, targets, indices, head.positive_iou, check=False)
    assert len(rows) == 2 + len(refinement.valid) and 2 < weights.sum() < len(rows)
    iou_logits = refinement.iou_logits[rows]
    losses = roi_box_losses(refinement.refined_boxes[rows], target_boxes, weights, iou_logits, 2.0)
    reference = compact_losses(refinement, targets, indices, head.positive_iou, 2.0)
    parameters = [p for p in head.parameters() if p.requires_grad]
    for name, value in reference.items():
        assert torch.allclose(losses[name], value, atol=1e-6), name
        ours = torch.autograd.grad(losses[name], parameters, retain_graph=True, allow_unused=True)
        theirs = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
        for a, b in zip(ours, theirs):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6)), name


def test_rows_that_train_nothing_stay_finite_with_a_degenerate_box():
    head, logits, boxes, inputs, targets, indices = training_case()
    refinement = head(logits, boxes, inputs, matched_mask(indices, (2, 8), boxes.device), max_extra=2)
    rows, target_boxes, weights = positive_targets(refinement, targets, indices, head.positive_iou, check=False)
    refined = refinement.refined_boxes.detach().clone()
    idle = int((refinement.batch_index == 1).nonzero()[0])  # image 1 has no boxes: its rows train nothing
    assert weights[2 + idle] == 0 and idle not in rows[:2]
    refined[idle] = 0.0  # an empty box
    refined.requires_grad_(True)
    losses = roi_box_losses(refined[rows], target_boxes, weights, refinement.iou_logits[rows].detach(), 2.0)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values()) and torch.isfinite(refined.grad).all()
    assert refined.grad[idle].abs().sum() == 0


def test_one_training_step_of_the_roi_config_averages_the_box_count_once(monkeypatch):
    calls, average = [], criterion_module.average_num_boxes

    def counting(targets, device):
        calls.append(len(targets))
        return average(targets, device)

    for module in (meta_arch, criterion_module, head_module):
        monkeypatch.setattr(module, "average_num_boxes", counting)
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(str(TINY_CONFIG.with_name("salience_detr_tiny_synthetic_roi.py"))).model)
    model.train()
    with count_dispatch(sync_sites=True) as counts:
        losses = model(fixed_batches(2)[1])
    assert calls == [2] and {"loss_roi_bbox", "loss_roi_giou", "loss_roi_iou"} <= set(losses)
    assert counts.total_syncs == 0, counts.table(0)
    model.eval()
    with torch.no_grad(), count_dispatch(sync_sites=True) as counts:
        model([{"image": fixed_batches(1)[0][0]["image"]}])
    assert "roi_refine" not in " ".join(counts.sync_sites), counts.table(0)  # inference: the exact top-k rows


def test_the_row_bound_covers_every_selected_query_and_the_public_losses_check_the_matches():
    head, logits, boxes, inputs, targets, indices = training_case()
    matched = matched_mask(indices, (2, 8), boxes.device)
    refinement = head(logits, boxes, inputs, matched, max_extra=2)
    assert int(refinement.valid.sum()) == 2 * 3 + 1  # the bound 3 + 3 + 2 covers every selected query
    with pytest.raises(ValueError, match="extra_selected"):
        head.losses(head(logits, boxes, inputs), targets, indices)
