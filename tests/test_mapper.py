"""DetrDatasetMapper: boxes stay consistent with the image through every augmentation, and bad input errors."""

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.data import DetrDatasetMapper, UnreadableImageError

SMALL = dict(
    min_sizes=[64, 80], max_size=100, crop_pre_sizes=[60, 70], crop_size=[40, 56], test_min_size=64, test_max_size=100
)


def _write_marked_image(path, height=60, width=90, box=(10, 20, 40, 50)):
    """A black image with one white rectangle, so the box can be found again in the augmented image."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = 255
    Image.fromarray(image).save(path)
    return {
        "file_name": str(path),
        "height": height,
        "width": width,
        "image_id": 1,
        "annotations": [{"bbox": list(box), "bbox_mode": BoxMode.XYXY_ABS, "category_id": 2, "iscrowd": 0}],
    }


def _white_extent(image_chw):
    ys, xs = np.nonzero(image_chw.numpy()[0] > 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


@pytest.mark.parametrize("seed", range(12))
def test_training_boxes_follow_the_image(tmp_path, seed):
    record = _write_marked_image(tmp_path / "a.png")
    mapper = DetrDatasetMapper(is_train=True, **SMALL)
    np.random.seed(seed)
    out = mapper(record)
    image = out["image"]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    h, w = image.shape[1:]
    boxes = out["instances"].gt_boxes.tensor.numpy()
    assert ((boxes[:, 0::2] >= 0) & (boxes[:, 0::2] <= w) & (boxes[:, 1::2] >= 0) & (boxes[:, 1::2] <= h)).all()
    if len(boxes):  # the crop may cut the rectangle out
        np.testing.assert_allclose(boxes[0], _white_extent(image), atol=2.0)
        assert out["instances"].gt_classes.tolist() == [2]


def test_flip_mirrors_the_box(tmp_path):
    record = _write_marked_image(tmp_path / "a.png")
    mapper = DetrDatasetMapper(is_train=True, augmentations=[T.RandomFlip(prob=1.0)])
    out = mapper(record)
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor[0].numpy(), [90 - 40, 20, 90 - 10, 50])
    np.testing.assert_allclose(_white_extent(out["image"]), [50, 20, 80, 50])


def test_crowd_and_degenerate_boxes_are_removed(tmp_path):
    record = _write_marked_image(tmp_path / "a.png")
    record["annotations"] += [
        {"bbox": [0, 0, 30, 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 1},
        {"bbox": [5, 5, 5.5, 30], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1, "iscrowd": 0},
    ]
    mapper = DetrDatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(60, 1000)])
    out = mapper(record)
    assert out["instances"].gt_classes.tolist() == [2]


def test_eval_resizes_shortest_edge_and_drops_annotations(tmp_path):
    record = _write_marked_image(tmp_path / "a.png")
    out = DetrDatasetMapper(is_train=False, **SMALL)(record)
    assert tuple(out["image"].shape[1:]) == (64, 96)
    assert "annotations" not in out and "instances" not in out
    assert (out["height"], out["width"]) == (60, 90)


def test_unreadable_image_raises_with_file_name(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    record = {"file_name": str(bad), "height": 10, "width": 10, "image_id": 1, "annotations": []}
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        DetrDatasetMapper(is_train=True, **SMALL)(record)


def test_unreadable_image_is_skipped_and_counted(tmp_path, caplog):
    mapper = DetrDatasetMapper(is_train=True, on_unreadable="skip", **SMALL)
    for name in ("missing1.jpg", "missing2.jpg"):
        record = {"file_name": str(tmp_path / name), "height": 10, "width": 10, "image_id": 1, "annotations": []}
        assert mapper(record) is None
    assert mapper.unreadable_count == 2
    assert "missing2.jpg" in caplog.text and "2 skipped so far" in caplog.text


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="on_unreadable must be one of"):
        DetrDatasetMapper(is_train=True, on_unreadable="ignore")
    with pytest.raises(ValueError, match="crop_size must be"):
        DetrDatasetMapper(is_train=True, crop_size=(600, 384))
