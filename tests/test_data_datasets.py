"""COCO-format dataset registration, path errors, and the training dicts' filtering."""

import json

import pytest
from conftest import TINY_SPEC
from detectron2.data import DatasetCatalog

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.data import DatasetPathError, SyntheticSpec, load_detection_dicts, register_coco_dataset


@pytest.fixture
def tiny_coco(tiny_synthetic_cache):
    folder = tiny_synthetic_cache / SyntheticSpec(**TINY_SPEC).folder_name()
    return str(folder / "train.json"), str(folder / "train")


def test_register_reports_num_classes_and_is_idempotent(tiny_coco):
    info = register_coco_dataset("reg_test_a", *tiny_coco)
    assert info["num_classes"] == 5 and info["thing_classes"][0] == "circle"
    assert register_coco_dataset("reg_test_a", *tiny_coco)["num_classes"] == 5
    assert len(DatasetCatalog.get("reg_test_a")) == TINY_SPEC["num_train"]


def test_same_name_with_other_paths_is_refused(tiny_coco, tiny_synthetic_cache):
    register_coco_dataset("reg_test_b", *tiny_coco)
    val_json = tiny_coco[0].replace("train.json", "val.json")
    with pytest.raises(ValueError, match="already registered with other paths"):
        register_coco_dataset("reg_test_b", val_json, tiny_coco[1])


@pytest.mark.parametrize("which", ["json", "images"])
def test_missing_path_names_it(tiny_coco, tmp_path, which):
    json_file, image_root = tiny_coco
    missing = str(tmp_path / "nowhere")
    args = (missing, image_root) if which == "json" else (json_file, missing)
    with pytest.raises(DatasetPathError, match="nowhere"):
        register_coco_dataset(f"reg_missing_{which}", *args)
    assert f"reg_missing_{which}" not in DatasetCatalog.list()


def test_json_without_categories_is_refused(tiny_coco, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="no 'categories'"):
        register_coco_dataset("reg_no_categories", str(bad), tiny_coco[1])


def test_training_dicts_drop_crowd_degenerate_and_empty(tiny_coco, tmp_path):
    coco = json.loads(open(tiny_coco[0]).read())
    first, second = coco["images"][0]["id"], coco["images"][1]["id"]
    kept = [a for a in coco["annotations"] if a["image_id"] not in (first, second)]
    kept.append({"id": 900, "image_id": first, "category_id": 1, "bbox": [1, 1, 10, 10], "area": 100, "iscrowd": 1})
    kept.append({"id": 901, "image_id": second, "category_id": 1, "bbox": [1, 1, 0.5, 10], "area": 5, "iscrowd": 0})
    coco["annotations"] = kept
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(coco))
    register_coco_dataset("reg_filtered", str(path), tiny_coco[1])
    train = load_detection_dicts("reg_filtered")
    assert {d["image_id"] for d in train}.isdisjoint({first, second})
    assert len(train) == TINY_SPEC["num_train"] - 2
    assert len(load_detection_dicts("reg_filtered", filter_empty=False)) == TINY_SPEC["num_train"]
    assert len(load_detection_dicts("reg_filtered", filter_empty=False, max_images=3)) == 3


def test_unknown_dataset_name_lists_registered(tiny_coco):
    with pytest.raises(KeyError, match="not registered"):
        load_detection_dicts("no_such_dataset")
