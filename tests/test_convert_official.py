from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.checkpoint.official import (
    BACKBONE_RULES,
    ConversionError,
    backbone_family,
    coco_category_ids,
    convert_official_state_dict,
    convert_resnet_entry,
    unwrap_checkpoint,
)
from salience_detr.checkpoint.synthetic import random_official_state_dict, read_official_keys
from salience_detr.tools import convert_official

REPO = Path(__file__).resolve().parents[1]
KEYS_NAME = "official_r50_state_dict_keys.tsv"
R50_CONFIG = REPO / "configs" / "models" / "salience_detr_r50.py"


CLASS_ROW_KEYS = [f"transformer.decoder.class_head.{i}.{p}" for i in range(6) for p in ("weight", "bias")] + [
    "transformer.encoder_class_head.weight",
    "transformer.encoder_class_head.bias",
    "transformer.encoder.enhance_mcsp.weight",
    "transformer.encoder.enhance_mcsp.bias",
    "denoising_generator.label_encoder.weight",
]


def synthetic_official_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors with every key, shape and dtype of the official R50 model; tied entries share a tensor."""
    entries = read_official_keys(REPO / "tests" / "data" / KEYS_NAME)
    assert len(entries) == 1025
    return random_official_state_dict(entries, seed=0)


@pytest.fixture(scope="module")
def model():
    return instantiate(LazyConfig.load(str(R50_CONFIG)).model)


@pytest.fixture(scope="module")
def target_shapes(model):
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def official():
    return synthetic_official_state_dict()


def test_converted_official_r50_loads_strictly(model, target_shapes, official):
    converted = convert_official_state_dict(official, target_shapes, family=backbone_family(model.backbone))
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # values land unchanged on renamed keys
    torch.testing.assert_close(model.backbone.stem.conv1.weight, official["backbone.conv1.weight"])
    torch.testing.assert_close(model.backbone.stem.conv1.norm.running_var, official["backbone.bn1.running_var"])
    torch.testing.assert_close(model.backbone.res4[5].conv3.norm.bias, official["backbone.layer3.5.bn3.bias"])
    torch.testing.assert_close(
        model.backbone.res5[0].shortcut.weight, official["backbone.layer4.0.downsample.0.weight"]
    )
    neck_bn = "transformer.neck.pan_blocks.1.conv2.1.num_batches_tracked"
    assert converted[neck_bn].dtype == torch.int64 and torch.equal(converted[neck_bn], official[neck_bn])
    torch.testing.assert_close(model.transformer.tgt_embed.weight, official["transformer.tgt_embed.weight"])


def test_class_rows_follow_coco_ids(target_shapes, official):
    ids = coco_category_ids()
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90 and 12 not in ids  # person first, toothbrush last
    converted = convert_official_state_dict(official, target_shapes)
    for key in CLASS_ROW_KEYS:
        assert converted[key].shape[0] == 80
        torch.testing.assert_close(converted[key], official[key][ids])
    torch.testing.assert_close(
        converted["transformer.decoder.class_head.2.weight"][0], official["transformer.decoder.class_head.2.weight"][1]
    )
    # the tie between the two-stage class head and the encoder's enhance_mcsp survives
    torch.testing.assert_close(
        converted["transformer.encoder.enhance_mcsp.weight"], converted["transformer.encoder_class_head.weight"]
    )


def test_classes_buffer_is_dropped(target_shapes, official):
    with_classes = dict(official, _classes_=torch.tensor([112, 101, 114, -1]))
    converted = convert_official_state_dict(with_classes, target_shapes)
    assert "_classes_" not in converted and len(converted) == len(target_shapes)


def test_wrong_shape_is_refused_with_its_name(target_shapes, official):
    broken = dict(official)
    broken["transformer.decoder.layers.2.linear1.weight"] = torch.zeros(1024, 256)
    with pytest.raises(ConversionError, match=r"transformer\.decoder\.layers\.2\.linear1\.weight.*\(1024, 256\)"):
        convert_official_state_dict(broken, target_shapes)


def test_unknown_keys_are_refused_with_their_names(target_shapes, official):
    with pytest.raises(ConversionError, match=r"transformer\.extra_head\.weight.*no such entry"):
        convert_official_state_dict(dict(official, **{"transformer.extra_head.weight": torch.zeros(3)}), target_shapes)
    with pytest.raises(ConversionError, match=r"backbone\.fc\.weight"):
        convert_official_state_dict(dict(official, **{"backbone.fc.weight": torch.zeros(1000, 2048)}), target_shapes)


def test_missing_entries_are_refused(target_shapes, official):
    partial = {k: v for k, v in official.items() if not k.startswith("transformer.decoder.norm.")}
    with pytest.raises(ConversionError, match=r"transformer\.decoder\.norm\.bias"):
        convert_official_state_dict(partial, target_shapes)


def test_unsupported_class_count_is_refused(target_shapes, official):
    broken = dict(official)
    broken["denoising_generator.label_encoder.weight"] = torch.zeros(20, 256)
    with pytest.raises(ConversionError, match=r"label_encoder\.weight.*20 class rows"):
        convert_official_state_dict(broken, target_shapes)


def test_resnet_rename_rules():
    rename = [
        ("backbone.conv1.weight", "backbone.stem.conv1.weight"),
        ("backbone.bn1.running_mean", "backbone.stem.conv1.norm.running_mean"),
        ("backbone.layer1.0.conv2.weight", "backbone.res2.0.conv2.weight"),
        ("backbone.layer2.3.bn3.weight", "backbone.res3.3.conv3.norm.weight"),
        ("backbone.layer3.0.downsample.0.weight", "backbone.res4.0.shortcut.weight"),
        ("backbone.layer4.0.downsample.1.running_var", "backbone.res5.0.shortcut.norm.running_var"),
    ]
    value = torch.zeros(1)
    for official_key, ours in rename:
        assert convert_resnet_entry(official_key, value) == (ours, value)
    with pytest.raises(ConversionError, match="layer5"):
        convert_resnet_entry("backbone.layer5.0.conv1.weight", value)


def test_large_backbone_families_are_selectable(target_shapes, official):
    assert {"resnet", "convnext", "swin", "focalnet"} <= set(BACKBONE_RULES)
    # a ResNet checkpoint converted with the Swin layout is refused, naming a backbone key
    with pytest.raises(ConversionError, match=r"backbone\.conv1\.weight"):
        convert_official_state_dict(official, target_shapes, family="swin")
    with pytest.raises(ConversionError, match="unknown backbone family 'vgg'"):
        convert_official_state_dict(official, target_shapes, family="vgg")


def test_unwrap_checkpoint_variants():
    state_dict = {"a.weight": torch.zeros(2)}
    assert unwrap_checkpoint(state_dict) == (state_dict, None)
    for wrapper in ("model", "state_dict", "ema"):
        assert unwrap_checkpoint({wrapper: state_dict, "epoch": 3}) == (state_dict, wrapper)
    with pytest.raises(ConversionError, match="found no state dict"):
        unwrap_checkpoint({"optimizer": {"lr": 1e-4}})


def test_cli_writes_a_file_detection_checkpointer_loads(tmp_path, model, official, capsys):
    source, output = tmp_path / "official.pth", tmp_path / "out" / "converted.pth"
    torch.save({"model": official}, source)
    assert convert_official.main([str(source), str(output), "--config-file", str(R50_CONFIG)]) == 0
    report = capsys.readouterr().out
    assert "the 'model' entry" in report and "class rows picked by category id in 17 entries" in report
    assert [p.name for p in output.parent.iterdir()] == ["converted.pth"]  # no temporary file left behind

    torch.nn.init.zeros_(model.transformer.tgt_embed.weight)
    incompatible = DetectionCheckpointer(model).load(str(output))
    assert incompatible == {}  # nothing left beyond "model"
    torch.testing.assert_close(model.transformer.tgt_embed.weight, official["transformer.tgt_embed.weight"])
    saved = torch.load(output, map_location="cpu", weights_only=True)
    assert set(saved) == {"model"} and set(saved["model"]) == set(model.state_dict())


def test_cli_reports_refusal(tmp_path, model, official, capsys, monkeypatch):
    monkeypatch.setattr(convert_official, "instantiate", lambda config: model)  # the config was built above
    source = tmp_path / "official.pth"
    torch.save(dict(official, **{"transformer.unknown": torch.zeros(1)}), source)
    assert convert_official.main([str(source), str(tmp_path / "out.pth"), "--config-file", str(R50_CONFIG)]) == 1
    assert "transformer.unknown" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()
