"""Budgets of data-dependent host syncs and ATen calls of the tiny config (a training step and an eval forward).

On a GPU every sync stalls the stream; the counts are the same on the CPU, so a change that adds a sync or a
burst of small calls fails here. Counted on the CPU, where the matcher's one device-to-host transfer of the
cost matrices is free and not counted (on a GPU it is one ``device_to_host``). Lower a budget when a change
removes syncs or calls; never raise one without a reason in the commit message.
"""

from __future__ import annotations

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from test_loss_curve import TINY_CONFIG, fixed_batches

from salience_detr.layers.levels import host_starts
from salience_detr.modeling.matcher import HungarianMatcher
from salience_detr.utils.dispatch_count import count_dispatch

# nothing: class checks run in numpy on the host copies, token budgets come from the host image sizes, grid NMS has a
# fixed query count (the matcher's one transfer is free on the CPU; run_step adds one: tests/test_trainer_syncs.py)
TRAIN_SYNCS = 0
# forward + backward (3,779 counted): the criterion scores every output set at once (one class term, host
# indices, pairwise GIoU cost), salience targets in one pass, padding masks, targets and denoising layout from host
# sizes, the self-attentions (batch-first, fused query/key), linears on rows, one box-head pass per decoder layer,
# anchors (once), reference points, valid ratios, sine, level and background embeddings of every level at once
TRAIN_CALLS = 3815
# the kept detections (postprocess_detections: finiteness and empty boxes)
EVAL_SYNCS = 1
EVAL_CALLS = 1250  # 1,238 counted
# the RoI head adds none: a host bound on its rows, every level's RoIAlign over all rows, weighted fixed positives
ROI_TRAIN_SYNCS = TRAIN_SYNCS
ROI_TRAIN_CALLS = 4725  # 4,681 counted


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return instantiate(LazyConfig.load(str(TINY_CONFIG)).model)


def test_training_step_stays_within_its_sync_and_call_budget(tiny_model):
    batch = fixed_batches(2)[1]  # two images with boxes
    tiny_model.train()
    with count_dispatch(sync_sites=True) as counts:
        sum(tiny_model(batch).values()).backward()
    assert counts.total_syncs <= TRAIN_SYNCS, counts.table(0)
    assert counts.total_calls <= TRAIN_CALLS, counts.table(10)


def test_training_step_with_the_roi_head_stays_within_its_budget():
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(str(TINY_CONFIG.with_name("salience_detr_tiny_synthetic_roi.py"))).model)
    model.train()
    with count_dispatch(sync_sites=True) as counts:
        losses = model(fixed_batches(2)[1])
        sum(losses.values()).backward()
    assert counts.total_syncs <= ROI_TRAIN_SYNCS, counts.table(0)
    assert counts.total_calls <= ROI_TRAIN_CALLS, counts.table(10)
    assert "loss_roi_giou" in losses, "the head ran"


def test_eval_forward_stays_within_its_sync_and_call_budget(tiny_model):
    image = fixed_batches(1)[0][0]["image"]
    tiny_model.eval()
    with torch.no_grad(), count_dispatch(sync_sites=True) as counts:
        tiny_model([{"image": image}])
    assert counts.total_syncs <= EVAL_SYNCS, counts.table(0)
    assert counts.total_calls <= EVAL_CALLS, counts.table(10)


def test_the_level_layout_reaches_the_model_as_host_values(tiny_model):
    """No per-level loop reads spatial_shapes or level_start_index back from a tensor."""
    tiny_model.eval()
    with torch.no_grad(), count_dispatch(sync_sites=True) as counts:
        tiny_model([{"image": fixed_batches(1)[0][1]["image"]}])
    sites = " ".join(counts.sync_sites)
    for module in ("transformer.py", "encoder.py", "ms_deform_attn.py", "image_list.py"):
        assert module not in sites, counts.table(0)
    assert host_starts([(2, 3), (1, 2), (1, 1)]) == [0, 6, 8]


def test_matching_every_set_at_once_equals_matching_each_set():
    generator = torch.Generator().manual_seed(0)
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.rand(2, 4, generator=generator) * 0.5 + 0.25},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([0]), "boxes": torch.rand(1, 4, generator=generator) * 0.5 + 0.25},
    ]
    sets = [(torch.randn(3, q, 5, generator=generator), torch.rand(3, q, 4, generator=generator)) for q in (6, 6, 4)]
    matcher = HungarianMatcher()
    together = matcher.match_sets(sets, targets)
    for (logits, boxes), matched in zip(sets, together):
        alone = matcher(logits, boxes, targets)
        assert all(torch.equal(a, b) for pair_a, pair_b in zip(alone, matched) for a, b in zip(pair_a, pair_b))
    assert [len(query) for query, _ in together[0]] == [2, 0, 1]
    with pytest.raises(ValueError, match="NaN/inf"):
        matcher.match_sets([sets[0], (sets[1][0], torch.full((3, 6, 4), float("nan")))], targets)


def test_filter_ratios_outside_zero_one_are_refused_when_the_model_is_built():
    cfg = LazyConfig.load(str(TINY_CONFIG))
    cfg.model.transformer.level_filter_ratio = (0.4, 0.8, 1.5, 1.0)
    with pytest.raises(ValueError, match=r"level_filter_ratio must lie in \[0, 1\]"):
        instantiate(cfg.model)
