"""DETR-style dataset mapper: the augmentation of spec §8.3 expressed with detectron2 transforms.

Training: random horizontal flip, then with equal probability either a multi-scale resize, or a
resize -> random crop -> multi-scale resize. Evaluation: one shortest-edge resize. The model receives
uint8 CHW RGB images and ``Instances`` with absolute XYXY boxes in the augmented image; crowd and
degenerate boxes are removed here so the model never sees them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .image_io import read_image

logger = logging.getLogger(__name__)

DETR_MIN_SIZES = tuple(range(480, 801, 32))
DETR_CROP_PRE_SIZES = (400, 500, 600)
DETR_CROP_SIZE = (384, 600)
UNREADABLE_POLICIES = ("raise", "skip")
MIN_BOX_SIDE = 1.0  # pixels; thinner boxes are degenerate (spec §8.3, SanitizeBoundingBox)


class UnreadableImageError(RuntimeError):
    """An image file of the dataset could not be decoded."""


class DetrDatasetMapper:
    """Map one detectron2 dataset dict to the model input of ``SalienceDETR``.

    Every size is a constructor argument so small configs can scale the recipe down (the defaults are the
    COCO recipe). ``on_unreadable="skip"`` logs a warning, counts the file and returns ``None`` (detectron2's
    ``MapDataset`` then draws another image); ``"raise"`` stops with the file name.
    """

    def __init__(
        self,
        is_train: bool,
        min_sizes: Sequence[int] = DETR_MIN_SIZES,
        max_size: int = 1333,
        crop_pre_sizes: Sequence[int] = DETR_CROP_PRE_SIZES,
        crop_size: Sequence[int] = DETR_CROP_SIZE,
        test_min_size: int = 800,
        test_max_size: int = 1333,
        image_format: str = "RGB",
        on_unreadable: str = "raise",
    ) -> None:
        if on_unreadable not in UNREADABLE_POLICIES:
            raise ValueError(f"on_unreadable must be one of {UNREADABLE_POLICIES}, got {on_unreadable!r}")
        if len(crop_size) != 2 or crop_size[0] > crop_size[1]:
            raise ValueError(f"crop_size must be (min, max) with min <= max, got {tuple(crop_size)}")
        self.is_train = is_train
        self.image_format = image_format
        self.on_unreadable = on_unreadable
        self.unreadable_count = 0
        if is_train:
            self.augmentation = [T.RandomFlip(), T.ResizeShortestEdge(list(min_sizes), max_size, "choice")]
            self.augmentation_with_crop = [
                T.RandomFlip(),
                T.ResizeShortestEdge(list(crop_pre_sizes), sample_style="choice"),
                T.RandomCrop("absolute_range", tuple(crop_size)),
                T.ResizeShortestEdge(list(min_sizes), max_size, "choice"),
            ]
        else:
            self.augmentation = [T.ResizeShortestEdge(test_min_size, test_max_size)]
            self.augmentation_with_crop = None

    def _read_image(self, file_name: str) -> np.ndarray | None:
        try:
            return read_image(file_name, format=self.image_format)
        except (OSError, ValueError, SyntaxError) as error:
            if self.on_unreadable == "raise":
                raise UnreadableImageError(
                    f"Cannot read image {file_name!r} ({error}). Fix or remove the file, or build the mapper "
                    "with on_unreadable='skip' to skip such images with a warning."
                ) from error
            self.unreadable_count += 1
            logger.warning(
                "Skipping unreadable image %s (%s); %d skipped so far.", file_name, error, self.unreadable_count
            )
            return None

    def _choose_augmentation(self) -> T.AugmentationList:
        if self.augmentation_with_crop is not None and np.random.rand() < 0.5:
            return T.AugmentationList(self.augmentation_with_crop)
        return T.AugmentationList(self.augmentation)

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any] | None:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read_image(dataset_dict["file_name"])
        if image is None:
            return None
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self._choose_augmentation()(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        annotations = dataset_dict.pop("annotations", None)
        if not self.is_train or annotations is None:
            return dataset_dict
        kept = [
            utils.transform_instance_annotations(_boxes_only(obj), transforms, image_shape)
            for obj in annotations
            if obj.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(kept, image_shape)
        dataset_dict["instances"] = instances[_has_min_side(instances.gt_boxes.tensor, MIN_BOX_SIDE)]
        return dataset_dict


def _has_min_side(boxes: torch.Tensor, min_side: float) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)


def _boxes_only(annotation: dict[str, Any]) -> dict[str, Any]:
    """Drop masks and keypoints: this is a box detector, and transforming polygons costs time."""
    return {key: value for key, value in annotation.items() if key not in ("segmentation", "keypoints")}
