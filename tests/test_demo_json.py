"""Predictions as data: the predictor's batches equal one-by-one prediction, and demo.py --output-json writes COCO
results (images and video frames) that evaluate_json scores. Tiny synthetic config, random weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY_SPEC
from demo_loading import load_demo_cli
from detectron2.data import Metadata
from detectron2.structures import Boxes, Instances

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.config import load_config
from salience_detr.data import SHAPE_CLASSES
from salience_detr.tools import evaluate_json
from salience_detr.utils.coco_results import ImageIds, ResultsFile, detection_records

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "salience_detr" / "salience_detr_tiny_synthetic.py")
PREFIX = "demo_json"  # its own dataset names, so other tests' registrations are left alone


demo_cli = load_demo_cli("salience_detr_demo_json_cli")
from predictor import SaliencePredictor  # noqa: E402  (demo.py put demo/ on sys.path)


def _tiny_overrides(cache_dir) -> list[str]:
    spec = [f"datasets.synthetic.{key}={value}" for key, value in TINY_SPEC.items()]
    return spec + [
        f"datasets.synthetic.cache_dir={cache_dir}",
        f"datasets.synthetic.prefix={PREFIX}",
        f"dataloader.train.dataset.names={PREFIX}_train",
        f"dataloader.test.dataset.names={PREFIX}_val",
        "train.device=cpu",
    ]


def test_detection_records_convert_boxes_and_categories():
    instances = Instances((100, 100))
    instances.pred_boxes = Boxes(torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]]))
    instances.scores = torch.tensor([0.9, 0.25])
    instances.pred_classes = torch.tensor([1, 0])
    coco = Metadata(thing_classes=["cat", "dog"], thing_dataset_id_to_contiguous_id={3: 0, 17: 1})
    first, second = detection_records(instances, coco, image_id=7, file_name="a.jpg", frame=None)
    assert first == {
        "image_id": 7,
        "file_name": "a.jpg",
        "category_id": 17,
        "category_name": "dog",
        "bbox": [10.0, 20.0, 30.0, 40.0],
        "score": pytest.approx(0.9),
    }
    assert second["category_id"] == 3 and second["category_name"] == "cat" and "frame" not in second
    # no dataset ids: the contiguous class; no names: no category_name; an unknown image id is left out
    bare, _ = detection_records(instances, Metadata(), image_id=None, file_name="a.jpg")
    assert bare["category_id"] == 1 and "category_name" not in bare and "image_id" not in bare


def test_image_ids_by_path_then_by_unique_name(tmp_path):
    images = [
        {"id": 1, "file_name": "a.jpg"},
        {"id": 2, "file_name": "sub/b.jpg"},
        {"id": 3, "file_name": "other/b.jpg"},
    ]
    ids = ImageIds(images, str(tmp_path))
    assert ids(str(tmp_path / "sub" / "b.jpg")) == 2
    assert ids("/elsewhere/a.jpg") == 1  # a copy of a.jpg: only one image has that name
    assert ids("/elsewhere/b.jpg") is None  # two images are called b.jpg: not guessed
    with pytest.raises(ValueError, match="ending in .json"):
        ResultsFile(str(tmp_path), Metadata())


@pytest.mark.slow
def test_batched_prediction_equals_one_by_one(tiny_synthetic_cache):
    cfg = load_config(TINY_CONFIG, _tiny_overrides(tiny_synthetic_cache), inference=True)
    torch.manual_seed(0)
    predictor = SaliencePredictor(cfg)
    rng = np.random.default_rng(0)
    # three of one size and one of another: batches only ever hold images of one input size
    shapes = [(96, 128, 3), (128, 96, 3), (96, 128, 3), (96, 128, 3)]
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    alone = [predictor(image) for image in images]
    batched = predictor(images, batch_size=2)
    assert len(batched) == len(images)
    for one, many in zip(alone, batched):
        assert len(one.instances) == len(many.instances) > 0
        assert one.input_size == many.input_size
        torch.testing.assert_close(many.instances.pred_boxes.tensor, one.instances.pred_boxes.tensor, atol=1e-5, rtol=0)
        torch.testing.assert_close(many.instances.scores, one.instances.scores, atol=1e-5, rtol=0)
        assert torch.equal(many.instances.pred_classes, one.instances.pred_classes)
    with pytest.raises(ValueError, match="batch_size"):
        predictor(images, batch_size=0)


def test_image_folder_runs_as_full_batches_of_one_size(tiny_synthetic_cache, tmp_path, monkeypatch):
    """Files of two sizes in alternation, --batch-size 2: two forwards of two images, not four of one."""
    rng = np.random.default_rng(1)
    for index, shape in enumerate([(96, 128, 3), (128, 96, 3)] * 2):
        cv2.imwrite(str(tmp_path / f"{index}.png"), rng.integers(0, 256, shape, dtype=np.uint8))
    batches = []
    run = SaliencePredictor._run
    monkeypatch.setattr(
        SaliencePredictor, "_run", lambda self, inputs: batches.append(len(inputs)) or run(self, inputs)
    )
    argv = ["--config-file", TINY_CONFIG, "--input", str(tmp_path / "*.png"), "--batch-size", "2"]
    argv += ["--confidence-threshold", "0"]
    argv += ["--output-json", str(tmp_path / "out.json"), "--opts", *_tiny_overrides(tiny_synthetic_cache)]
    assert demo_cli.main(argv) == 0
    assert batches == [2, 2] and len({r["file_name"] for r in json.loads((tmp_path / "out.json").read_text())}) == 4


@pytest.mark.slow
def test_output_json_is_scored_by_evaluate_json(tiny_synthetic_cache, tmp_path):
    val_root = Path(tiny_synthetic_cache).glob("*/val")
    image_root = next(val_root)
    out = tmp_path / "results.json"
    argv = ["--config-file", TINY_CONFIG, "--input", str(image_root), "--output-json", str(out)]
    argv += ["--batch-size", "3", "--confidence-threshold", "0", "--opts", *_tiny_overrides(tiny_synthetic_cache)]
    assert demo_cli.main(argv) == 0
    records = json.loads(out.read_text())
    gt = json.loads((image_root.parent / "val.json").read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    assert {r["image_id"] for r in records} == {i["id"] for i in gt["images"]}
    assert {Path(r["file_name"]).name for r in records} == {i["file_name"] for i in gt["images"]}
    assert all(names[r["category_id"]] == r["category_name"] for r in records)
    assert {r["category_name"] for r in records} <= set(SHAPE_CLASSES)
    assert all(r["bbox"][2] >= 0 and r["bbox"][3] >= 0 and 0 <= r["score"] <= 1 for r in records)
    metrics = evaluate_json.main(["--dataset", f"{PREFIX}_val", "--json", str(out)])
    assert 0.0 <= metrics["AP"] <= 100.0 and 0.0 <= metrics["AP50"] <= 100.0
    assert not list(tmp_path.glob(".results.json.*"))  # the atomic write left no temporary file


@pytest.mark.slow
def test_output_json_has_video_frames(tiny_synthetic_cache, tmp_path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (128, 96))
    assert writer.isOpened(), "the test needs OpenCV's MJPG writer"
    rng = np.random.default_rng(1)
    for _ in range(3):
        writer.write(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    writer.release()
    out = tmp_path / "frames.json"
    argv = ["--config-file", TINY_CONFIG, "--video-input", str(video), "--max-frames", "2", "--output-json", str(out)]
    # no --output: only the detections are written, nothing is drawn or shown (there is no display here)
    assert demo_cli.main([*argv, "--confidence-threshold", "0", "--opts", *_tiny_overrides(tiny_synthetic_cache)]) == 0
    records = json.loads(out.read_text())
    assert {r["frame"] for r in records} == {0, 1}
    assert {r["file_name"] for r in records} == {str(video)}
    assert not any("image_id" in r for r in records)


def test_bad_output_json_stops_before_the_model(tmp_path, caplog):
    argv = ["--config-file", TINY_CONFIG, "--input", str(tmp_path), "--output-json", str(tmp_path)]
    demo_logger = logging.getLogger("salience_detr.demo")  # setup_logger stops it propagating to the root
    demo_logger.addHandler(caplog.handler)
    try:
        assert demo_cli.main(argv) == 2
    finally:
        demo_logger.removeHandler(caplog.handler)
    assert "--output-json" in caplog.text and "ending in .json" in caplog.text
    assert demo_cli.main(["--config-file", TINY_CONFIG, "--input", str(tmp_path), "--batch-size", "0"]) == 2
