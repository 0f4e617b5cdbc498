"""Results files that do not belong to the dataset are refused by evaluate_json and visualize_json_results before any
scoring or drawing, with counts, examples and the fix; boxes beyond their images are warned about."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import TINY_SPEC
from detectron2.data import DatasetCatalog, MetadataCatalog

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.data import register_synthetic_datasets
from salience_detr.data.results_check import ResultsMismatchError, check_results_match
from salience_detr.tools import evaluate_json, visualize_json_results


@pytest.fixture
def val_set(tiny_synthetic_cache):
    infos = register_synthetic_datasets(prefix="results_check", cache_dir=str(tiny_synthetic_cache), **TINY_SPEC)
    return infos["val"]


def _ground_truth_results(json_file: str) -> list[dict]:
    coco = json.loads(open(json_file).read())
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in coco["annotations"]
    ]


def _both_tools(val_set, tmp_path, results: list[dict]) -> list:
    """Run evaluate_json and visualize_json_results on ``results``; the errors they raised (None when they ran)."""
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    runs = (
        lambda: evaluate_json.main(["--dataset", val_set["name"], "--json", str(path)]),
        lambda: visualize_json_results.main(
            ["--input", str(path), "--dataset", val_set["name"], "--output", str(tmp_path / "vis"), "--num-images", "1"]
        ),
    )
    errors = []
    for run in runs:
        try:
            run()
            errors.append(None)
        except ResultsMismatchError as error:
            errors.append(error)
    return errors


def test_results_of_other_images_are_refused_by_both_tools(val_set, tmp_path):
    results = _ground_truth_results(val_set["json_file"])
    foreign = [{**results[0], "image_id": 9001}, {**results[0], "image_id": 9001}, {**results[1], "image_id": 9002}]
    for error in _both_tools(val_set, tmp_path, results + foreign):
        assert error is not None
        message = str(error)
        assert f"does not belong to dataset {val_set['name']!r} ({TINY_SPEC['num_val']} images)" in message
        assert (
            f"3 of {len(results) + 3} results name 2 image ids that are not in the dataset, e.g. 9001, 9002" in message
        )
        assert "Pass the dataset these results were computed on" in message
    assert not (tmp_path / "vis").exists(), "nothing may be drawn before the check"


def test_unknown_category_ids_are_refused_not_ignored(val_set, tmp_path):
    results = _ground_truth_results(val_set["json_file"])
    results[0]["category_id"] = 77
    for error in _both_tools(val_set, tmp_path, results):
        assert error is not None
        assert "1 results use category ids that are not in the dataset (id: count 77: 1)" in str(error)
        assert "the dataset has 1, 2, 3, 4, 5" in str(error)


def test_named_results_of_another_dataset_with_the_same_ids_are_refused(val_set):
    """The demo's --output-json names each image's file and each category: a file of another dataset whose image ids,
    sizes and category ids all overlap is told apart by those names."""
    records = {r["image_id"]: r for r in DatasetCatalog.get(val_set["name"])}
    named = [
        {**r, "file_name": records[r["image_id"]]["file_name"], "category_name": "anything"}
        for r in _ground_truth_results(val_set["json_file"])
    ]
    with pytest.raises(ResultsMismatchError, match="category names the dataset does not use") as error:
        check_results_match(named, val_set["name"])
    assert "name another file" not in str(error.value)
    named[0]["file_name"] = "/elsewhere/street_0001.jpg"
    with pytest.raises(ResultsMismatchError, match="1 results name another file") as error:
        check_results_match(named, val_set["name"])
    assert "'street_0001.jpg'" in str(error.value)
    metadata = MetadataCatalog.get(val_set["name"])
    classes = {k: metadata.thing_classes[v] for k, v in metadata.thing_dataset_id_to_contiguous_id.items()}
    right = [{**r, "category_name": classes[r["category_id"]]} for r in named[1:]]
    check_results_match(right, val_set["name"])


def test_contiguous_class_indices_get_the_mapping_hint(val_set):
    results = [{**r, "category_id": 0} for r in _ground_truth_results(val_set["json_file"])]  # index 0, id 1
    with pytest.raises(ResultsMismatchError, match="look like contiguous class indices") as error:
        check_results_match(results, val_set["name"])
    assert "thing_dataset_id_to_contiguous_id" in str(error.value)


def test_matching_results_pass_and_boxes_beyond_the_image_are_warned(val_set, caplog):
    results = _ground_truth_results(val_set["json_file"])
    with caplog.at_level(logging.WARNING, logger="salience_detr.data.results_check"):
        check_results_match(results, val_set["name"])
    assert not caplog.records
    image = next(
        i for i in json.loads(open(val_set["json_file"]).read())["images"] if i["id"] == results[0]["image_id"]
    )
    results.append({**results[0], "bbox": [image["width"] - 10, 5, 40, 20]})
    with caplog.at_level(logging.WARNING, logger="salience_detr.data.results_check"):
        check_results_match(results, val_set["name"])
    assert f"1 of {len(results)} results have boxes beyond their image" in caplog.text
    assert f"({image['width']}x{image['height']}): bbox [{image['width'] - 10}.0, 5.0, 40.0, 20.0]" in caplog.text


def test_dataset_without_category_mapping_is_named(val_set):
    name = "results_check_no_mapping"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"image_id": 1, "width": 8, "height": 8, "file_name": "x.jpg"}])
    with pytest.raises(ResultsMismatchError, match="no thing_dataset_id_to_contiguous_id metadata") as error:
        check_results_match([], name)
    assert "--coco-json and --image-root" in str(error.value)
