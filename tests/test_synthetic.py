"""The built-in synthetic dataset: deterministic, COCO-valid, atomic generation, registered like COCO."""

import json
import os

import numpy as np
import pytest
from conftest import TINY_SPEC
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.data import (
    SHAPE_CLASSES,
    SyntheticSpec,
    ensure_synthetic_dataset,
    register_synthetic_datasets,
    synthetic,
)


def test_files_are_valid_coco_with_boxes_inside_images(tiny_synthetic_cache):
    folder = ensure_synthetic_dataset(SyntheticSpec(**TINY_SPEC), tiny_synthetic_cache)
    for split, count in (("train", TINY_SPEC["num_train"]), ("val", TINY_SPEC["num_val"])):
        coco = json.loads((folder / f"{split}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == list(SHAPE_CLASSES)
        assert len(coco["images"]) == count
        sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
        for im in coco["images"]:
            assert Image.open(folder / split / im["file_name"]).size == sizes[im["id"]]
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= width and y + h <= height
            assert 0 < ann["area"] <= w * h


def test_generation_is_deterministic_and_varied():
    spec = SyntheticSpec(**TINY_SPEC)
    image_a, objects_a = synthetic.generate_image(spec, "train", 5)
    image_b, objects_b = synthetic.generate_image(spec, "train", 5)
    np.testing.assert_array_equal(image_a, image_b)
    assert objects_a == objects_b
    many = SyntheticSpec(num_train=40, num_val=1, image_size=128, max_objects=6, min_object_size=8, max_object_size=96)
    objects = [obj for i in range(40) for obj in synthetic.generate_image(many, "train", i)[1]]
    assert {obj["class_id"] for obj in objects} == set(range(len(SHAPE_CLASSES)))
    sides = [max(obj["bbox"][2:]) for obj in objects]
    assert min(sides) < 16 and max(sides) > 64  # tiny to large


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    spec = SyntheticSpec(**TINY_SPEC)

    def fail_on_val(spec_, split, folder):
        if split == "val":
            raise OSError("disk full")
        original(spec_, split, folder)

    original = synthetic._write_split
    monkeypatch.setattr(synthetic, "_write_split", fail_on_val)
    with pytest.raises(OSError, match="disk full"):
        ensure_synthetic_dataset(spec, tmp_path)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(synthetic, "_write_split", original)
    folder = ensure_synthetic_dataset(spec, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [folder.name]


def test_registered_names_load_through_the_catalog(tiny_synthetic_cache):
    infos = register_synthetic_datasets(prefix="tiny_shapes", cache_dir=str(tiny_synthetic_cache), **TINY_SPEC)
    assert infos["train"]["num_classes"] == len(SHAPE_CLASSES)
    dicts = DatasetCatalog.get("tiny_shapes_val")
    assert len(dicts) == TINY_SPEC["num_val"]
    assert MetadataCatalog.get("tiny_shapes_val").thing_classes == list(SHAPE_CLASSES)
    assert all(0 <= a["category_id"] < len(SHAPE_CLASSES) for d in dicts for a in d["annotations"])


def test_default_names_are_registered_on_import():
    assert {"synthetic_train", "synthetic_val"} <= set(DatasetCatalog.list())


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="min_object_size <= max_object_size"):
        SyntheticSpec(min_object_size=50, max_object_size=20)
    with pytest.raises(ValueError, match="num_train and num_val"):
        SyntheticSpec(num_train=0)
