from pathlib import Path

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)

OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_r50_state_dict_keys.tsv"
# docs/model.md#parameter-count: 56 080 495 unique parameters with 91-way heads; the 80-class model drops 11 rows of
# the 6 decoder class heads, the (tied) encoder class head and the denoising label embedding.
OFFICIAL_PARAMS_91 = 56_080_495
UNUSED_ROWS = 91 - 80
EXPECTED_PARAMS_80 = OFFICIAL_PARAMS_91 - UNUSED_ROWS * (7 * (256 + 1) + 256)
CLASS_ROW_KEYS = ("class_head", "enhance_mcsp", "label_encoder")
EXPERIMENTS = ["salience_detr_r50_4scale_12ep", "salience_detr_r50_4scale_24ep", "salience_detr_r50_5scale_12ep"]


def official_rows():
    lines = open(OFFICIAL_KEYS).read().splitlines()[1:]
    return {
        key: tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
        for key, shape, *_ in (line.split("\t") for line in lines)
    }


@pytest.fixture(scope="module")
def r50_model():
    torch.manual_seed(0)
    return instantiate(LazyConfig.load("configs/models/salience_detr_r50.py").model)


def official_unique_params(num_classes):
    """Unique parameters of the official model (tied entries once) with its 91 class rows cut to num_classes."""
    total = 0
    for line in open(OFFICIAL_KEYS).read().splitlines()[1:]:
        key, shape, _, kind, numel = line.split("\t")
        if not kind.startswith("param") or "tied" in kind:
            continue
        rows = int(shape.strip("()").split(",")[0])
        total += int(numel) // rows * num_classes if any(k in key for k in CLASS_ROW_KEYS) else int(numel)
    return total


def test_r50_parameter_count(r50_model):
    assert official_unique_params(91) == OFFICIAL_PARAMS_91
    assert official_unique_params(80) == EXPECTED_PARAMS_80
    assert sum(p.numel() for p in r50_model.parameters()) == EXPECTED_PARAMS_80


def test_r50_state_dict_matches_official_layout(r50_model):
    official = official_rows()
    state = r50_model.state_dict()
    ours = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("backbone.")}
    theirs = {k: v for k, v in official.items() if not k.startswith("backbone.")}
    assert set(ours) == set(theirs)
    for key, shape in theirs.items():
        if any(part in key for part in CLASS_ROW_KEYS) and shape[0] == 91:
            shape = (80, *shape[1:])
        assert ours[key] == shape, key
    backbone = [k for k in state if k.startswith("backbone.")]
    assert len(backbone) == sum(k.startswith("backbone.") for k in official)
    assert "backbone.stem.conv1.weight" in state and "backbone.res5.2.conv3.norm.running_var" in state
    assert (
        state["transformer.encoder.enhance_mcsp.weight"].data_ptr()
        == state["transformer.encoder_class_head.weight"].data_ptr()
    )


def test_r50_frozen_stem_and_res2(r50_model):
    frozen = {n for n, p in r50_model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.stem.", "backbone.res2.")) for n in frozen)
    assert r50_model.backbone.res3[0].conv1.weight.requires_grad


def test_5scale_model_config():
    cfg = LazyConfig.load("configs/models/salience_detr_r50_5scale.py")
    model = instantiate(cfg.model)
    assert model.in_features == ["res2", "res3", "res4", "res5"]
    assert len(model.neck.convs) == 4
    assert model.neck.convs[0][0].in_channels == 256
    assert model.transformer.encoder.background_embedding.row_embed.weight.shape[0] == 500


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_configs_load_and_save(name, tmp_path):
    cfg = LazyConfig.load(f"configs/salience_detr/{name}.py")
    assert {"model", "optimizer", "lr_multiplier", "dataloader", "train"} <= set(cfg)
    assert cfg.model.num_classes == 80
    assert cfg.train.max_iter > 80_000
    assert name.split("_")[-1] in cfg.train.output_dir and name.split("_")[-2] in cfg.train.output_dir
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    reloaded = LazyConfig.load(str(tmp_path / "config.yaml"))
    assert reloaded.model.transformer.num_queries == 900


def make_input(height, width, boxes, classes):
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8), "instances": instances}


@pytest.mark.slow
def test_r50_training_step_gives_40_loss_terms(r50_model):
    r50_model.train()
    batch = [make_input(256, 320, [[10, 10, 100, 120], [150, 60, 300, 250]], [3, 79]), make_input(224, 288, [], [])]
    with torch.no_grad():
        losses = r50_model(batch)
    assert len(losses) == 40
    assert all(torch.isfinite(v) for v in losses.values())
