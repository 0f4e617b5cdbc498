"""Confusion matrix and precision-recall curves of a COCO evaluation, on a case small enough to count by hand."""

import contextlib
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.evaluation import box_iou_xywh, confusion_from_coco, confusion_matrix, match_detections
from salience_detr.evaluation.plots import precision_recall_curves, write_evaluation_plots
from salience_detr.tools import evaluate_json

CAT, DOG = 3, 7  # dataset ids that are not contiguous, as in COCO

GROUND_TRUTH = {
    1: [
        {"bbox": [0, 0, 10, 10], "category_id": CAT},  # A
        {"bbox": [20, 20, 10, 10], "category_id": DOG},  # B
        {"bbox": [50, 50, 10, 10], "category_id": CAT, "iscrowd": 1},  # C, left out
    ],
    2: [{"bbox": [0, 0, 10, 10], "category_id": DOG}],  # D
}
DETECTIONS = {
    1: [
        {"bbox": [0, 0, 10, 10], "category_id": CAT, "score": 0.9},  # takes A: right class
        {"bbox": [0, 0, 10, 10], "category_id": DOG, "score": 0.8},  # A is taken: false positive
        {"bbox": [21, 20, 10, 10], "category_id": CAT, "score": 0.7},  # B called a cat
        {"bbox": [100, 100, 5, 5], "category_id": DOG, "score": 0.95},  # on nothing: false positive
        {"bbox": [50, 50, 10, 10], "category_id": DOG, "score": 0.6},  # on the crowd: false positive
        {"bbox": [0, 0, 10, 10], "category_id": CAT, "score": 0.3},  # below the score threshold
    ],
    2: [{"bbox": [5, 0, 10, 10], "category_id": CAT, "score": 0.9}],  # IoU 1/3 with D: D missed, this one false
}
# rows: ground truth cat, dog, background; columns: predicted cat, dog, background
EXPECTED = np.array([[1, 0, 0], [1, 0, 1], [1, 3, 0]])


def test_box_iou_xywh():
    ious = box_iou_xywh(
        np.array([[0, 0, 10, 10], [0, 0, 0, 0]]), np.array([[5, 0, 10, 10], [0, 0, 10, 10], [20, 0, 1, 1]])
    )
    np.testing.assert_allclose(ious, [[50 / 150, 1.0, 0.0], [0.0, 0.0, 0.0]])


def test_matching_is_greedy_in_score_and_ignores_classes():
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 12]])
    dets = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [40, 40, 5, 5]])
    # the better-scored second detection takes the object it overlaps most; the first gets the other one
    assert match_detections(gt, dets, np.array([0.5, 0.9, 0.99]), 0.5).tolist() == [1, 0, -1]
    assert match_detections(gt, dets, np.array([0.5, 0.9, 0.99]), 0.95).tolist() == [-1, 0, -1]
    assert match_detections(gt[:0], dets, np.array([0.5, 0.9, 0.99]), 0.5).tolist() == [-1, -1, -1]


def test_confusion_matrix_by_hand():
    matrix = confusion_matrix(GROUND_TRUTH, DETECTIONS, [CAT, DOG], iou_threshold=0.5, score_threshold=0.5)
    np.testing.assert_array_equal(matrix, EXPECTED)
    # with no score threshold the 0.3 cat on A is one more false positive cat
    low = confusion_matrix(GROUND_TRUTH, DETECTIONS, [CAT, DOG], iou_threshold=0.5, score_threshold=0.0)
    np.testing.assert_array_equal(low - EXPECTED, [[0, 0, 0], [0, 0, 0], [1, 0, 0]])


def test_bad_iou_threshold_is_refused():
    with pytest.raises(ValueError, match="iou_threshold"):
        confusion_matrix(GROUND_TRUTH, DETECTIONS, [CAT, DOG], iou_threshold=0.0)


def _write_coco(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 120, "width": 120} for i in GROUND_TRUTH]
    annotations = []
    for image_id, objects in GROUND_TRUTH.items():
        for obj in objects:
            area = obj["bbox"][2] * obj["bbox"][3]
            annotations.append({**obj, "iscrowd": obj.get("iscrowd", 0), "area": area, "image_id": image_id})
    for number, annotation in enumerate(annotations, start=1):
        annotation["id"] = number
    categories = [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    for image in images:
        Image.new("RGB", (120, 120)).save(tmp_path / image["file_name"])
    results = [{**d, "image_id": i} for i, dets in DETECTIONS.items() for d in dets]
    return path, results


def _evaluated(gt_path, results):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def test_confusion_from_coco_eval_counts_the_same(tmp_path):
    gt_path, results = _write_coco(tmp_path)
    evaluator = _evaluated(gt_path, results)
    np.testing.assert_array_equal(confusion_from_coco(evaluator, 0.5, 0.5), EXPECTED)


def test_precision_recall_of_perfect_detections_is_one(tmp_path):
    gt_path, _ = _write_coco(tmp_path)
    perfect = [
        {"image_id": i, "bbox": o["bbox"], "category_id": o["category_id"], "score": 0.9}
        for i, objects in GROUND_TRUTH.items()
        for o in objects
        if not o.get("iscrowd")
    ]
    recall, precision = precision_recall_curves(_evaluated(gt_path, perfect), 0.5)
    assert precision.shape == (2, len(recall))
    np.testing.assert_allclose(precision, 1.0)
    # only the dog on image 2: half of the dogs found, all cats missed
    recall, precision = precision_recall_curves(_evaluated(gt_path, perfect[-1:]), 0.5)
    np.testing.assert_array_equal(precision[0], 0.0)
    np.testing.assert_allclose(precision[1], np.where(recall <= 0.5, 1.0, 0.0))
    with pytest.raises(ValueError, match="not one of the evaluation's thresholds"):
        precision_recall_curves(_evaluated(gt_path, perfect), 0.52)


def test_plots_and_tables_are_written(tmp_path):
    gt_path, results = _write_coco(tmp_path)
    paths = write_evaluation_plots(_evaluated(gt_path, results), str(tmp_path / "plots"))
    for name in ("precision_recall.png", "confusion_matrix.png"):
        with Image.open(paths[name]) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    rows = list(csv.reader(open(paths["confusion_matrix.csv"])))
    assert rows[0] == ["ground truth \\ predicted", "cat", "dog", "background"]
    assert [[int(v) for v in row[1:]] for row in rows[1:]] == EXPECTED.tolist()
    record = json.loads(open(paths["confusion_matrix.json"]).read())
    assert record["labels"] == ["cat", "dog", "background"] and record["matrix"] == EXPECTED.tolist()


def test_evaluate_json_plots_flag(tmp_path):
    gt_path, results = _write_coco(tmp_path)
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))
    plots = tmp_path / "out"
    argv = ["--dataset", "confusion_test", "--coco-json", str(gt_path), "--image-root", str(tmp_path)]
    evaluate_json.main([*argv, "--json", str(results_path), "--plots", str(plots), "--plot-score-threshold", "0.0"])
    record = json.loads((plots / "confusion_matrix.json").read_text())
    assert record["score_threshold"] == 0.0
    np.testing.assert_array_equal(np.array(record["matrix"]) - EXPECTED, [[0, 0, 0], [0, 0, 0], [1, 0, 0]])
    assert (plots / "precision_recall.png").stat().st_size > 0


def test_empty_results_write_no_plots_and_say_so(tmp_path, caplog):
    gt_path, _ = _write_coco(tmp_path)
    with caplog.at_level("WARNING"):
        metrics = evaluate_json.evaluate_results(str(gt_path), [], plots_dir=str(tmp_path / "plots"))
    assert metrics["AP"] == 0.0 and not (tmp_path / "plots").exists()
    assert "nothing to plot" in caplog.text
