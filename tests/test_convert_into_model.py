"""convert_into_model: the one path (converter, parity tool, parity test) from an official state dict into a model."""

from pathlib import Path

import pytest
import torch
from detectron2.config import instantiate

from salience_detr.checkpoint.official import ConversionError, convert_into_model
from salience_detr.checkpoint.synthetic import random_official_state_dict, read_official_keys
from salience_detr.config import get_config

KEYS = Path(__file__).resolve().parent / "data" / "official_r50_state_dict_keys.tsv"


@pytest.fixture(scope="module")
def official():
    return random_official_state_dict(read_official_keys(KEYS), seed=3)


def test_the_official_weights_land_in_the_model_under_our_names(official):
    model = instantiate(get_config("models/salience_detr_r50.py").model)
    converted = convert_into_model(model, official)
    assert set(converted) == set(model.state_dict())
    torch.testing.assert_close(model.backbone.res3[1].conv2.weight, official["backbone.layer2.1.conv2.weight"])
    torch.testing.assert_close(model.transformer.tgt_embed.weight, official["transformer.tgt_embed.weight"])


def test_a_checkpoint_missing_an_entry_is_refused_before_the_model_changes(official):
    model = instantiate(get_config("models/salience_detr_r50.py").model)
    before = model.transformer.tgt_embed.weight.clone()
    broken = {key: value for key, value in official.items() if key != "transformer.tgt_embed.weight"}
    with pytest.raises(ConversionError, match="transformer.tgt_embed.weight"):
        convert_into_model(model, broken)
    assert torch.equal(model.transformer.tgt_embed.weight, before)
