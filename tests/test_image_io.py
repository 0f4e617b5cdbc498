"""The one image reader: 16-bit, grayscale, alpha and EXIF-rotated files decode the same in the training/eval mapper
and in the demo, and pixel types without an 8-bit meaning are refused with the file and the fix named."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data.detection_utils import SizeMismatchError
from PIL import Image

import salience_detr  # noqa: F401  (registers the meta-architecture and the built-in datasets)
from salience_detr.data import DetrDatasetMapper, UnreadableImageError
from salience_detr.data.image_io import UnsupportedImageModeError, read_image

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 24, 40
EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE = 6  # the stored picture must be turned 90 degrees clockwise to be shown upright


def _demo_module():
    spec = importlib.util.spec_from_file_location("salience_detr_demo_for_image_io", REPO / "demo" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _through_mapper(path: Path) -> np.ndarray:
    """RGB HWC as the evaluation mapper hands it to the model (its resize kept at the image's own size)."""
    height, width = read_image(str(path)).shape[:2]
    mapper = DetrDatasetMapper(is_train=False, test_min_size=min(height, width), test_max_size=10 * max(height, width))
    record = {"file_name": str(path), "height": height, "width": width, "image_id": 1}
    return mapper(record)["image"].numpy().transpose(1, 2, 0)


def _sixteen_bit_png(folder: Path) -> Path:
    pixels = np.full((HEIGHT, WIDTH), 40000, dtype=np.uint16)
    pixels[:, : WIDTH // 2] = 1000
    path = folder / "gray16.png"
    assert cv2.imwrite(str(path), pixels)
    assert Image.open(path).mode == "I;16"
    return path


def _grayscale_png(folder: Path) -> Path:
    path = folder / "gray8.png"
    Image.fromarray(np.tile(np.arange(WIDTH, dtype=np.uint8) * 5, (HEIGHT, 1))).save(path)
    return path


def _rgba_png(folder: Path) -> Path:
    pixels = np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8)
    pixels[..., :3] = (200, 100, 50)
    pixels[:, : WIDTH // 2, 3] = 0  # fully transparent left half keeps its stored colour
    path = folder / "rgba.png"
    Image.fromarray(pixels).save(path)
    return path


def _exif_rotated_jpeg(folder: Path) -> Path:
    """Stored landscape with a red left half; EXIF says turn it clockwise, so it shows portrait, red on top."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[:, : WIDTH // 2] = (255, 0, 0)
    pixels[:, WIDTH // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    path = folder / "rotated.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    return path


def test_sixteen_bit_grayscale_is_scaled_not_saturated(tmp_path):
    image = read_image(str(_sixteen_bit_png(tmp_path)))
    assert image.dtype == np.uint8 and image.shape == (HEIGHT, WIDTH, 3)
    assert (image[:, : WIDTH // 2] == 1000 >> 8).all()
    assert (image[:, WIDTH // 2 :] == 40000 >> 8).all()


def test_grayscale_becomes_three_equal_channels(tmp_path):
    image = read_image(str(_grayscale_png(tmp_path)))
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert image[0, 3, 0] == 15


def test_alpha_is_dropped_keeping_the_stored_colour(tmp_path):
    image = read_image(str(_rgba_png(tmp_path)))
    assert image.shape == (HEIGHT, WIDTH, 3)
    assert (image == (200, 100, 50)).all()


def test_exif_orientation_is_applied(tmp_path):
    image = read_image(str(_exif_rotated_jpeg(tmp_path)))
    assert image.shape == (WIDTH, HEIGHT, 3)
    top, bottom = image[: WIDTH // 2 - 2].reshape(-1, 3).mean(0), image[WIDTH // 2 + 2 :].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50, "red must be on top after turning the picture clockwise"
    assert bottom[2] > 200 and bottom[0] < 50


@pytest.mark.parametrize("make", [_sixteen_bit_png, _grayscale_png, _rgba_png, _exif_rotated_jpeg])
def test_mapper_and_demo_read_the_same_pixels(tmp_path, make):
    path = make(tmp_path)
    demo_rgb = _demo_module().read_image(str(path))[..., ::-1]
    np.testing.assert_array_equal(_through_mapper(path), read_image(str(path)))
    np.testing.assert_array_equal(_through_mapper(path), demo_rgb)


def test_bgr_and_gray_formats(tmp_path):
    path = _rgba_png(tmp_path)
    assert (read_image(str(path), format="BGR") == (50, 100, 200)).all()
    assert read_image(str(_sixteen_bit_png(tmp_path)), format="L").shape == (HEIGHT, WIDTH, 1)


def test_floating_point_image_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.zeros((HEIGHT, WIDTH), dtype=np.float32)).save(path)
    with pytest.raises(UnsupportedImageModeError) as error:
        read_image(str(path))
    assert str(path) in str(error.value) and "floating-point" in str(error.value)
    assert "Convert it to an 8- or 16-bit PNG or JPEG" in str(error.value)


def test_truncated_file_names_the_file_and_the_fix(tmp_path):
    path = _rgba_png(tmp_path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(OSError, match="Re-encode or replace the file") as error:
        read_image(str(path))
    assert str(path) in str(error.value)
    mapper = DetrDatasetMapper(is_train=False)
    with pytest.raises(UnreadableImageError, match="Fix or remove the file"):
        mapper({"file_name": str(path), "height": HEIGHT, "width": WIDTH, "image_id": 1})


def test_mapper_names_exif_when_the_json_has_the_stored_size(tmp_path):
    path = _exif_rotated_jpeg(tmp_path)
    mapper = DetrDatasetMapper(is_train=False)
    with pytest.raises(SizeMismatchError) as error:
        mapper({"file_name": str(path), "height": HEIGHT, "width": WIDTH, "image_id": 1})  # stored, not shown, size
    assert "Width and height are swapped" in str(error.value) and "exiftool -Orientation=" in str(error.value)
    with pytest.raises(SizeMismatchError) as error:
        mapper({"file_name": str(path), "height": 99, "width": 99, "image_id": 1})
    assert "EXIF" not in str(error.value), "an unrelated wrong size must not blame EXIF"
