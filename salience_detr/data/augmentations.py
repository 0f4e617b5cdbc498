"""Augmentation presets as lists of detectron2 ``T.Augmentation``, for ``DetrDatasetMapper(augmentations=...)``.

``detr_train_augmentations`` is the DETR recipe the mapper uses by default (random flip, then with equal
probability a multi-scale resize, or resize -> random crop -> multi-scale resize); ``large_scale_jitter`` is
the LSJ recipe (resize to a random scale of a square target, crop or pad to the target, flip), which the
official Salience DETR code offers as its ``lsj`` preset. Configs pick them in ``configs/common/data/augmentations.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from detectron2.data import transforms as T

DETR_MIN_SIZES = tuple(range(480, 801, 32))
DETR_MAX_SIZE = 1333
DETR_CROP_PRE_SIZES = (400, 500, 600)
DETR_CROP_SIZE = (384, 600)
DETR_TEST_SIZE = (800, 1333)
LSJ_PAD_VALUE = 128.0  # grey; the padded pixels are image content to the model, as in detectron2's LSJ baselines


class RandomChoice(T.Augmentation):
    """Apply one of several augmentation lists, chosen uniformly at random per image.

    One ``np.random.rand()`` draw picks the branch (the first when it is below 1/n, and so on), then the
    branch's own augmentations draw in order, as detectron2's ``AugmentationList`` does."""

    def __init__(self, choices: Sequence[Sequence[T.Augmentation]]) -> None:
        super().__init__()
        if len(choices) == 0:
            raise ValueError("RandomChoice needs at least one list of augmentations to choose from")
        self.choices = [T.AugmentationList(list(choice)) for choice in choices]

    def __call__(self, aug_input: T.AugInput) -> T.Transform:
        branch = min(int(np.random.rand() * len(self.choices)), len(self.choices) - 1)
        return self.choices[branch](aug_input)

    def __repr__(self) -> str:
        return f"RandomChoice({[choice.augs for choice in self.choices]})"


def detr_train_augmentations(
    min_sizes: Sequence[int] = DETR_MIN_SIZES,
    max_size: int = DETR_MAX_SIZE,
    crop_pre_sizes: Sequence[int] = DETR_CROP_PRE_SIZES,
    crop_size: Sequence[int] = DETR_CROP_SIZE,
) -> list[T.Augmentation]:
    """The DETR training recipe; each branch starts with its own flip (the crop branch is drawn first)."""
    if len(crop_size) != 2 or crop_size[0] > crop_size[1]:
        raise ValueError(f"crop_size must be (min, max) with min <= max, got {tuple(crop_size)}")
    multi_scale = T.ResizeShortestEdge(list(min_sizes), max_size, "choice")
    with_crop = [
        T.RandomFlip(),
        T.ResizeShortestEdge(list(crop_pre_sizes), sample_style="choice"),
        T.RandomCrop("absolute_range", tuple(crop_size)),
        multi_scale,
    ]
    return [RandomChoice([with_crop, [T.RandomFlip(), multi_scale]])]


def resize_test_augmentations(
    min_size: int = DETR_TEST_SIZE[0], max_size: int = DETR_TEST_SIZE[1]
) -> list[T.Augmentation]:
    """Evaluation: one shortest-edge resize, the longer side capped at ``max_size``."""
    return [T.ResizeShortestEdge(min_size, max_size)]


def large_scale_jitter(
    image_size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0, pad_value: float = LSJ_PAD_VALUE
) -> list[T.Augmentation]:
    """Large-scale jitter: scale to [min_scale, max_scale] x a square ``image_size``, crop or pad to it, flip."""
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"need 0 < min_scale <= max_scale, got min_scale={min_scale}, max_scale={max_scale}")
    return [
        T.ResizeScale(min_scale, max_scale, image_size, image_size),
        T.FixedSizeCrop((image_size, image_size), pad=True, pad_value=pad_value),
        T.RandomFlip(),
    ]
