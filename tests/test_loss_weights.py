"""Loss weights as an explicit mapping: every term the set criterion returns has its own entry."""

import pytest
import torch
from detectron2.config import instantiate
from test_criterion import NUM_CLASSES, full_outputs, make_targets

from salience_detr.config import get_config
from salience_detr.modeling.criterion import HybridSetCriterion, set_loss_weights
from salience_detr.modeling.matcher import HungarianMatcher

WEIGHTS = {"loss_class": 1.5, "loss_bbox": 5.0, "loss_giou": 2.0}


def test_total_loss_equals_weighting_by_base_name_on_a_seeded_batch():
    criterion = HybridSetCriterion(NUM_CLASSES, HungarianMatcher(), weight_dict=WEIGHTS, num_decoder_layers=4)
    outputs, targets = full_outputs(num_layers=4, seed=7), make_targets()
    weighted = criterion(outputs, targets)
    criterion.loss_weights = dict.fromkeys(criterion.loss_weights, 1.0)
    raw = criterion(outputs, targets)
    assert set(weighted) == set(raw) and len(raw) == 3 * (1 + 3 + 1 + 1 + 3)
    by_base_name = sum(value * WEIGHTS["_".join(name.split("_")[:2])] for name, value in raw.items())
    torch.testing.assert_close(sum(weighted.values()), by_base_name, rtol=0.0, atol=1e-7)


def test_the_mapping_names_every_layer_the_encoder_and_denoising():
    weights = set_loss_weights({"loss_giou": 2.0}, num_decoder_layers=3)
    assert weights == {
        name: 2.0
        for name in ("loss_giou", "loss_giou_enc", "loss_giou_dn", "loss_giou_0", "loss_giou_1")
        + ("loss_giou_dn_0", "loss_giou_dn_1")
    }
    with pytest.raises(ValueError, match="num_decoder_layers must be >= 1"):
        set_loss_weights(WEIGHTS, 0)


def test_more_decoder_layers_than_mapped_is_named_with_the_fix():
    criterion = HybridSetCriterion(NUM_CLASSES, HungarianMatcher(), num_decoder_layers=2)
    with pytest.raises(ValueError, match="set criterion.num_decoder_layers"):
        criterion(full_outputs(num_layers=3), make_targets())


def test_the_config_ties_the_mapping_to_the_decoder_depth():
    cfg = get_config("salience_detr/salience_detr_tiny_synthetic.py")
    criterion = instantiate(cfg.model.criterion)
    assert criterion.num_decoder_layers == cfg.model.transformer.decoder.num_layers == 3
    assert "loss_bbox_dn_1" in criterion.loss_weights and "loss_bbox_2" not in criterion.loss_weights
