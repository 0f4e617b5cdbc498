"""export_onnx's check: detections matched as sets (order free among near-equal scores, swaps at the top-K cut-off
excused), a mismatch described and the file kept; the output path refused before any export work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.tools import export_onnx
from salience_detr.tools.onnx_check import (
    Detections,
    check_output_path,
    describe_differences,
    label_mismatches,
    match_detections,
)

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "salience_detr" / "salience_detr_tiny_synthetic.py")
TOLERANCE = 1e-3


def _detections(order=(0, 1, 2, 3)) -> Detections:
    """Four detections; #1 and #2 have scores equal up to rounding (they may swap slots between runtimes)."""
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 25], [30, 30, 40, 45], [50, 10, 70, 30]], dtype=np.float32)
    scores = np.array([0.9, 0.6, 0.6 + 2e-4, 0.2], dtype=np.float32)
    labels = np.array([1, 2, 2, 0])
    index = list(order)
    return Detections(boxes[index], scores[index], labels[index])


def _match(reference: Detections, other: Detections):
    return match_detections(reference, other, box_tolerance=TOLERANCE, score_tolerance=TOLERANCE)


def test_two_swapped_near_equal_detections_pass():
    reference, swapped = _detections(), _detections((0, 2, 1, 3))
    assert not np.allclose(reference.boxes, swapped.boxes), "slot by slot these would differ"
    match = _match(reference, swapped)
    assert match.ok and sorted(match.pairs) == [(0, 0), (1, 2), (2, 1), (3, 3)]
    assert match.max_box_diff == 0.0 and match.max_score_diff == pytest.approx(0.0)


def test_a_moved_box_fails_and_is_described():
    reference, moved = _detections(), _detections()
    moved.boxes[2] += np.float32(2.5)
    match = _match(reference, moved)
    assert not match.ok and match.unmatched_reference == [2] and match.unmatched_other == [2]
    text = describe_differences(match, reference, moved, ("PyTorch", "onnxruntime"))
    assert "3 of 4 PyTorch detections match onnxruntime ones one to one" in text
    assert "unmatched: 1 PyTorch, 1 onnxruntime" in text
    assert "PyTorch #2 label 2 score 0.6002 box [30.00, 30.00, 40.00, 45.00]; nearest onnxruntime #2" in text
    assert "(box differs by 2.5 px)" in text


def test_another_label_or_score_beyond_the_tolerance_fails():
    reference, relabelled = _detections(), _detections()
    relabelled.labels[0] = 4
    match = _match(reference, relabelled)
    assert match.unmatched_reference == [0] and label_mismatches(match, reference, relabelled) == 1
    rescored = _detections()
    rescored.scores[3] += np.float32(0.01)
    assert _match(reference, rescored).unmatched_reference == [3]


def test_a_swap_at_the_top_k_cut_off_is_excused_but_only_in_pairs():
    reference, other = _detections(), _detections()
    other.boxes[3] = [80, 80, 90, 90]  # the last slot: another detection of the same score entered the top-K
    match = _match(reference, other)
    assert match.ok and match.at_cutoff == 1 and len(match.pairs) == 3
    fewer = Detections(other.boxes[:3], other.scores[:3], other.labels[:3])
    assert _match(reference, fewer).unmatched_reference == [3], "a detection that only left is not a swap"


def test_no_detections_on_one_side_is_described():
    reference = _detections()
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    match = _match(reference, empty)
    assert match.unmatched_reference == [0, 1, 2, 3]
    assert "onnxruntime has no detections" in describe_differences(match, reference, empty, ("PyTorch", "onnxruntime"))


def test_output_paths_are_checked(tmp_path):
    check_output_path(str(tmp_path / "new" / "deeper" / "model.onnx"))
    assert not (tmp_path / "new").exists(), "the check creates nothing"
    with pytest.raises(ValueError, match="is a folder; pass a file path such as"):
        check_output_path(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder; pass another path"):
        check_output_path(str(tmp_path / "notes.txt" / "model.onnx"))
    with pytest.raises(ValueError, match="cannot write into '/proc'.*pass a path in a folder you can write"):
        check_output_path("/proc/model.onnx")


def test_unwritable_output_stops_before_the_model_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(export_onnx, "load_config", lambda *a, **k: pytest.fail("the config was loaded"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        export_onnx.main(["--config-file", TINY_CONFIG, "--output", str(tmp_path / "notes.txt" / "m.onnx")])


def test_a_failed_check_says_what_differs_and_keeps_the_file(tmp_path, monkeypatch):
    reference, moved = _detections(), _detections()
    moved.boxes[0] += np.float32(4.0)
    match = _match(reference, moved)
    differences = describe_differences(match, reference, moved, ("PyTorch", "onnxruntime"))

    def fake_export(detector, image, output, opset):
        Path(output).write_bytes(b"onnx")

    def fake_compare(detector, image, onnx_file, tolerance):
        keys = ("max_abs_diff_boxes", "max_abs_diff_scores", "unmatched_pytorch", "num_detections")
        return {**dict.fromkeys(keys, 0), "matched": 3, "label_mismatches": 0, "differences": differences}

    monkeypatch.setattr(export_onnx, "export", fake_export)
    monkeypatch.setattr(export_onnx, "compare_with_onnxruntime", fake_compare)
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(image)
    output = tmp_path / "kept.onnx"
    opts = ["dataloader.test.mapper.test_min_size=64", "dataloader.test.mapper.test_max_size=96"]
    with pytest.raises(SystemExit) as error:
        export_onnx.main(
            ["--config-file", TINY_CONFIG, "--output", str(output), "--image", str(image), "--opts", *opts]
        )
    assert "disagree beyond --tolerance" in str(error.value) and "(box differs by 4 px)" in str(error.value)
    assert f"{output} is kept for inspection" in str(error.value) and output.read_bytes() == b"onnx"
