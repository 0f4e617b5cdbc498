"""The one image reader of training, evaluation, the demo and the tools.

Every path reads pixels the same way, so a model sees in the demo what it saw in training:

- EXIF orientation is applied (the picture as a viewer shows it; the json's width/height describe it so);
- 16-bit images are scaled to 8 bits by their high byte, as Pillow does for 16-bit colour PNGs and OpenCV for
  every 16-bit file. Pillow's own ``convert("RGB")`` clips 16-bit grayscale instead, turning it all white;
- grayscale becomes three equal channels; an alpha channel is dropped (the stored colour is kept, as OpenCV does).

The result is ``uint8`` HWC in ``format`` (``"RGB"``, ``"BGR"``, ``"L"`` or any Pillow mode detectron2 accepts).
"""

from __future__ import annotations

import numpy as np
from detectron2.data.detection_utils import SizeMismatchError, convert_PIL_to_numpy
from detectron2.data.detection_utils import check_image_size as detectron2_check_image_size
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
MAX_16_BIT = 65535
EXIF_SIZE_FIX = (
    "the json gives the stored size but the EXIF orientation tag turns the picture, so boxes drawn on the stored "
    "pixels would land wrong: remove the tag (e.g. exiftool -Orientation= FILE) or re-save the images upright "
    "and regenerate the json"
)


class UnsupportedImageModeError(ValueError):
    """The image's pixel type has no defined 8-bit meaning (e.g. floating point, or integers beyond 16 bits)."""


def read_image(path: str, format: str = "RGB") -> np.ndarray:
    """Decode ``path`` into a ``uint8`` HWC array in ``format`` (see the module docstring for the rules).

    Raises ``OSError`` for missing, undecodable or truncated files and :class:`UnsupportedImageModeError` for pixel
    types without an 8-bit meaning; both name the file.
    """
    with PathManager.open(path, "rb") as f:
        try:
            image = Image.open(f)
            image.load()
        except (OSError, SyntaxError) as error:  # Pillow's errors for undecodable and truncated data
            raise OSError(f"Cannot decode image {path!r}: {error}. Re-encode or replace the file.") from error
        image = to_8bit(ImageOps.exif_transpose(image), path)
    return convert_PIL_to_numpy(image, format)


def to_8bit(image: Image.Image, path: str = "<image>") -> Image.Image:
    """The image with 8 bits per channel: 16-bit grayscale scaled by its high byte; 8-bit modes unchanged.

    Written here because Pillow has no 16-bit-aware conversion to 8-bit modes (it clips at 255).
    """
    if image.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode == "I":  # 32-bit integers: Pillow's mode for some 16-bit files (PNG, TIFF) in older versions
        pixels = np.asarray(image)
        if pixels.size and (pixels.min() < 0 or pixels.max() > MAX_16_BIT):
            raise UnsupportedImageModeError(
                f"Image {path!r} holds 32-bit integers from {pixels.min()} to {pixels.max()}, beyond 16 bits, so "
                "they have no 8-bit meaning. Convert it to an 8- or 16-bit PNG or JPEG."
            )
        return Image.fromarray((pixels.astype(np.uint32) >> 8).astype(np.uint8))
    if image.mode == "F":
        raise UnsupportedImageModeError(
            f"Image {path!r} holds floating-point pixels, which have no defined 8-bit meaning. "
            "Convert it to an 8- or 16-bit PNG or JPEG."
        )
    return image


def check_image_size(record: dict, image: np.ndarray) -> None:
    """detectron2's check of the decoded image against the json's width/height, naming EXIF orientation as the
    cause when the json has the two swapped (the json written from the stored pixels, the reader turning them)."""
    try:
        detectron2_check_image_size(record, image)
    except SizeMismatchError as error:
        if (record.get("width"), record.get("height")) != (image.shape[0], image.shape[1]):
            raise
        raise SizeMismatchError(
            f"{error} Width and height are swapped: {EXIF_SIZE_FIX}. "
            "python -m salience_detr.tools.check_dataset lists every such file."
        ) from error
