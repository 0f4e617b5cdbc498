"""visualize_data --source dataloader draws the config's augmented training images with their surviving boxes."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SPEC
from detectron2.data import Metadata
from detectron2.structures import Boxes, Instances
from PIL import Image

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.tools import visualize_data
from salience_detr.tools._dataloader_view import draw_model_input

TINY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs/salience_detr/salience_detr_tiny_synthetic.py")


def test_draw_model_input_draws_the_boxes_on_the_mapped_image():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    instances = Instances(
        (40, 60), gt_boxes=Boxes(torch.tensor([[10.0, 5.0, 50.0, 35.0]])), gt_classes=torch.tensor([1])
    )
    metadata = Metadata(thing_classes=["a", "b"])
    drawn = draw_model_input({"image": image, "instances": instances}, metadata, "RGB")
    assert drawn.shape == (40, 60, 3)
    assert drawn[20, 10].any() and not drawn[20, 30].any()  # the box's left edge is drawn, its inside stays black
    empty = draw_model_input({"image": image}, metadata, "RGB")
    assert not empty.any()
    # BGR images are turned to RGB for drawing
    bgr = torch.zeros(3, 4, 4, dtype=torch.uint8)
    bgr[0] = 255
    assert draw_model_input({"image": bgr}, metadata, "BGR")[0, 0].tolist() == [0, 0, 255]


def test_dataloader_source_draws_augmented_sizes(tiny_synthetic_cache, tmp_path):
    overrides = [f"datasets.synthetic.{key}={value}" for key, value in TINY_SPEC.items()] + [
        f"datasets.synthetic.cache_dir={tiny_synthetic_cache}",
        "dataloader.train.num_workers=0",
        "dataloader.train.mapper.min_sizes=[48]",
        "dataloader.train.mapper.max_size=64",
        "dataloader.train.mapper.crop_pre_sizes=[48]",
        "dataloader.train.mapper.crop_size=[32,40]",
    ]
    out = tmp_path / "vis"
    argv = ["--source", "dataloader", "--config-file", TINY_CONFIG, "--output", str(out), "--num-images", "6"]
    written = visualize_data.main([*argv, "--opts", *overrides])
    assert len(written) == 6 and len(set(written)) == 6
    for path in written:
        with Image.open(path) as picture:
            # 96 px images come out with the shorter side 48 and the longer at most 64: the mapper's resize
            assert min(picture.size) == 48 and max(picture.size) <= 64, picture.size
    assert any(np.asarray(Image.open(p)).std() > 0 for p in written)


def test_dataloader_source_needs_a_config_and_a_positive_count(tmp_path):
    with pytest.raises(SystemExit):
        visualize_data.parse_args(["--source", "dataloader", "--output", str(tmp_path)])
    argv = ["--source", "dataloader", "--config-file", TINY_CONFIG, "--output", str(tmp_path), "--num-images", "0"]
    with pytest.raises(ValueError, match="positive"):
        visualize_data.main(argv)
    annotation = visualize_data.parse_args(["--dataset", "synthetic_val", "--output", str(tmp_path)])
    assert annotation.source == "annotation"
