"""Augmentations from the config: the default DETR recipe maps exactly as the mapper did before presets existed,
a preset chosen in a two-line config reaches the mapper, and overrides reach the preset's arguments."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.config.overrides import apply_overrides
from salience_detr.data import DetrDatasetMapper
from salience_detr.data.augmentations import RandomChoice, detr_train_augmentations, large_scale_jitter
from salience_detr.utils import inference

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
SMALL = dict(min_sizes=[64, 80], max_size=100, crop_pre_sizes=[60, 70], crop_size=[40, 56])
SMALL_TEST = dict(test_min_size=64, test_max_size=100)

# Recorded with the mapper before augmentations came from the config (its own flip/crop/resize lists):
# seed -> (image shape, first 16 hex digits of the image's sha256, boxes XYXY)
BEFORE_SMALL = {
    0: ((3, 67, 100), "667863ba17102ca9", [[11.0, 22.0, 44.0, 55.0], [55.0, 5.0, 94.0, 33.0]]),
    1: ((3, 64, 67), "8086ffa02af07498", [[0.0, 23.0, 40.0, 64.0], [56.0, 0.0, 67.0, 39.0]]),
    2: ((3, 64, 64), "c49964d02e0edd8d", [[53.0, 15.0, 64.0, 52.0], [0.0, 0.0, 41.0, 27.0]]),
    3: ((3, 64, 96), "8c0912491c0728b5", [[10.0, 21.0, 42.0, 53.0], [53.0, 5.0, 90.0, 32.0]]),
    5: ((3, 91, 80), "fbd312fabf32f804", [[0.0, 32.0, 6.0, 81.0], [22.0, 8.0, 80.0, 48.0]]),
}
BEFORE_COCO = {
    1: ((3, 480, 541), "aed295964f52fc5e", [[0.0, 157.0, 147.0, 419.0], [234.0, 27.0, 539.0, 245.0]]),
    3: ((3, 736, 1104), "dbf67eb507c355f6", [[122.0, 245.0, 490.0, 613.0], [613.0, 61.0, 1042.0, 368.0]]),
}
BEFORE_TEST = {"small": ((3, 64, 96), "8c0912491c0728b5"), "coco": ((3, 800, 1200), "0de7a50d25786b82")}


@pytest.fixture
def record(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    boxes = [[10, 20, 40, 50], [50, 5, 85, 30]]
    annotations = [
        {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": c, "iscrowd": 0} for box, c in zip(boxes, (2, 0))
    ]
    return {
        "file_name": str(tmp_path / "img.png"),
        "height": 60,
        "width": 90,
        "image_id": 1,
        "annotations": annotations,
    }


def _mapped(mapper, record, seed):
    np.random.seed(seed)
    out = mapper(record)
    digest = hashlib.sha256(out["image"].numpy().tobytes()).hexdigest()[:16]
    boxes = out["instances"].gt_boxes.tensor.numpy().round(3).tolist() if "instances" in out else None
    return tuple(out["image"].shape), digest, boxes


@pytest.mark.parametrize("explicit", [False, True], ids=["sizes", "preset"])
def test_default_recipe_maps_as_before(record, explicit):
    small = dict(augmentations=detr_train_augmentations(**SMALL)) if explicit else SMALL
    for kwargs, expected in ((small, BEFORE_SMALL), ({}, BEFORE_COCO)):
        mapper = DetrDatasetMapper(is_train=True, **kwargs)
        for seed, before in expected.items():
            assert _mapped(mapper, record, seed) == before, f"seed {seed}"
    assert _mapped(DetrDatasetMapper(is_train=False, **SMALL_TEST), record, 0)[:2] == BEFORE_TEST["small"]
    assert _mapped(DetrDatasetMapper(is_train=False), record, 0)[:2] == BEFORE_TEST["coco"]


def test_random_choice_takes_every_branch_equally():
    choice = RandomChoice([[T.RandomFlip(prob=1.0)], [T.NoOpTransform()], [T.ResizeShortestEdge(5, 10)]])
    np.random.seed(0)
    counts = np.zeros(3)
    for _ in range(600):
        aug_input = T.AugInput(np.zeros((4, 6, 3), dtype=np.uint8))
        transform = choice(aug_input).transforms[0]
        counts[[T.HFlipTransform, T.NoOpTransform, T.ResizeTransform].index(type(transform))] += 1
    assert (np.abs(counts - 200) < 40).all(), counts
    with pytest.raises(ValueError, match="at least one"):
        RandomChoice([])


def test_sizes_and_augmentations_together_are_refused():
    with pytest.raises(ValueError, match=r"both augmentations and \['max_size', 'min_sizes'\]"):
        DetrDatasetMapper(is_train=True, augmentations=large_scale_jitter(64), min_sizes=[64], max_size=100)
    with pytest.raises(ValueError, match="min_scale <= max_scale"):
        large_scale_jitter(64, min_scale=2.0, max_scale=1.0)


def test_large_scale_jitter_gives_square_images_with_boxes_inside(record):
    mapper = DetrDatasetMapper(is_train=True, augmentations=large_scale_jitter(96, 0.5, 2.0))
    for seed in range(6):
        np.random.seed(seed)
        out = mapper(record)
        assert tuple(out["image"].shape) == (3, 96, 96)
        boxes = out["instances"].gt_boxes.tensor
        assert ((boxes >= 0) & (boxes <= 96)).all()


def _two_line_config(tmp_path, preset):
    """The user's way: a config beside the shipped ones that imports one and switches its preset."""
    root = tmp_path / "configs"
    shutil.copytree(CONFIG_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    path = root / "salience_detr" / "tiny_augmented.py"
    path.write_text(
        "from .salience_detr_tiny_synthetic import dataloader, datasets, lr_multiplier, model, optimizer, train\n"
        "from ..common.data.augmentations import use_augmentations\n\n"
        f"use_augmentations(dataloader, {preset!r})\n"
    )
    return str(path)


def test_preset_and_override_reach_the_mapper(tmp_path, record):
    cfg = LazyConfig.load(_two_line_config(tmp_path, "lsj"))
    assert "min_sizes" not in cfg.dataloader.train.mapper and "test_min_size" not in cfg.dataloader.test.mapper
    cfg = apply_overrides(cfg, ["dataloader.train.mapper.augmentations.image_size=80"])
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert [type(a) for a in mapper.augmentations.augs] == [T.ResizeScale, T.FixedSizeCrop, T.RandomFlip]
    np.random.seed(0)
    assert tuple(mapper(record)["image"].shape) == (3, 80, 80)
    test_mapper = instantiate(cfg.dataloader.test.mapper)
    assert [(a.short_edge_length, a.max_size) for a in test_mapper.augmentations.augs] == [((1024, 1024), 1024)]


def test_detr_preset_in_a_config_equals_the_default_mapper(tmp_path, record):
    cfg = LazyConfig.load(_two_line_config(tmp_path, "detr"))
    mapper = instantiate(cfg.dataloader.train.mapper)
    for seed, before in BEFORE_COCO.items():
        assert _mapped(mapper, record, seed) == before
    with pytest.raises(ValueError, match="unknown augmentation preset 'strong'"):
        LazyConfig.load(_two_line_config(tmp_path / "again", "strong"))


def test_demo_preprocessing_follows_the_test_preset(tmp_path):
    cfg = LazyConfig.load(_two_line_config(tmp_path, "lsj"))
    overrides = ["dataloader.test.mapper.augmentations.min_size=64", "dataloader.test.mapper.augmentations.max_size=64"]
    augmentations, image_format = inference.test_augmentations(apply_overrides(cfg, overrides))
    assert inference.resize_for_model(np.zeros((60, 90, 3), np.uint8), augmentations, image_format).shape == (43, 64, 3)
    cfg.dataloader.test.mapper = {"_target_": "detectron2.data.Metadata", "name": "not a mapper"}
    with pytest.raises(ValueError, match="has no 'augmentations'"):
        inference.test_augmentations(cfg)
